-- Where a new slot starts: the listener resumes there. A slot of this name that was
-- used before (acked_lsn set) and is created again lost the changes it held: a sweep is
-- owed, unless one already is. At a position behind the old one too: that is another
-- server (a dump restored, a backup, a failover), where WAL positions began again lower,
-- and what the old slot held never reached it.
INSERT INTO cdc_invalidator.slot_state_v1 AS st (slot_name, acked_lsn)
VALUES (%(slot)s, %(lsn)s::pg_lsn)
ON CONFLICT (slot_name) DO UPDATE
SET acked_lsn = EXCLUDED.acked_lsn,
    resync_reason = CASE
        WHEN st.acked_lsn IS NULL OR st.acked_lsn = EXCLUDED.acked_lsn THEN st.resync_reason
        WHEN st.acked_lsn > EXCLUDED.acked_lsn THEN coalesce(st.resync_reason, format(
            'replication slot %%s was created again at %%s, behind %%s, where the old one '
            'had been confirmed: this is another server (a restore, a failover), and what '
            'the old slot held may never have been invalidated',
            st.slot_name, EXCLUDED.acked_lsn, st.acked_lsn))
        ELSE coalesce(st.resync_reason, format(
            'replication slot %%s was created again at %%s; the old one had been confirmed '
            'to %%s: changes in between may have been missed',
            st.slot_name, EXCLUDED.acked_lsn, st.acked_lsn))
    END
RETURNING resync_reason
