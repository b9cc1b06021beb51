-- create_slot.sql's slot (run on its own too), made a failover slot (PostgreSQL 17+):
-- a standby with sync_replication_slots = on copies it, and once promoted has it where
-- the primary's was last synchronized. Not temporary, no two_phase (the listener takes
-- committed transactions only).
SELECT lsn::text FROM pg_create_logical_replication_slot(%(slot)s, 'pgoutput', false, false, true)
