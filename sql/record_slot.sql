-- Where a new slot starts: the listener resumes there. A slot of this name that was
-- used before (acked_lsn set) and is created again lost the changes in between: a
-- sweep is owed, unless one already is.
INSERT INTO cdc_invalidator.slot_state_v1 AS st (slot_name, acked_lsn)
VALUES (%(slot)s, %(lsn)s::pg_lsn)
ON CONFLICT (slot_name) DO UPDATE
SET acked_lsn = EXCLUDED.acked_lsn,
    resync_reason = CASE
        WHEN st.acked_lsn IS NULL OR st.acked_lsn >= EXCLUDED.acked_lsn THEN st.resync_reason
        ELSE coalesce(st.resync_reason, format(
            'replication slot %%s was created again at %%s; the old one had been confirmed '
            'to %%s: changes in between may have been missed',
            st.slot_name, EXCLUDED.acked_lsn, st.acked_lsn))
    END
RETURNING resync_reason
