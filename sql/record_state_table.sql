-- Trigger mode's install, switching from logical mode once it queued its sweep of every
-- watched table: listener_state_v1's row recorded in this table and database (recorded_in,
-- recorded_in_database, schema.sql).
-- Logical mode tells a restore by slot_state_v1's marks, and its listener's role may not
-- write this one, which stays as the dump left it: the switch's sweep covers a restore.
UPDATE cdc_invalidator.listener_state_v1
SET recorded_in = 'cdc_invalidator.listener_state_v1'::regclass,
    recorded_in_database = cdc_invalidator.database_oid_v1()
WHERE recorded_in IS DISTINCT FROM 'cdc_invalidator.listener_state_v1'::regclass
   OR recorded_in_database IS DISTINCT FROM cdc_invalidator.database_oid_v1()
