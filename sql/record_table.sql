-- Logical mode, at each connect and at install: every row of slot_state_v1 recorded in
-- this table and database (recorded_in, recorded_in_database, logical.sql), once a sweep
-- owed for a restore or a copy is recorded (set_resync.sql; logical_install.sql).
UPDATE cdc_invalidator.slot_state_v1
SET recorded_in = 'cdc_invalidator.slot_state_v1'::regclass,
    recorded_in_database = cdc_invalidator.database_oid_v1()
WHERE recorded_in IS DISTINCT FROM 'cdc_invalidator.slot_state_v1'::regclass
   OR recorded_in_database IS DISTINCT FROM cdc_invalidator.database_oid_v1()
