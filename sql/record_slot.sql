-- Where a new slot starts: the listener resumes there.
INSERT INTO cdc_invalidator.slot_state_v1 (slot_name, acked_lsn) VALUES (%(slot)s, %(lsn)s::pg_lsn)
ON CONFLICT (slot_name) DO UPDATE SET acked_lsn = EXCLUDED.acked_lsn
