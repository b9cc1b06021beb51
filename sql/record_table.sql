-- Logical mode, at each connect: every row of slot_state_v1 recorded in this table
-- (recorded_in, logical.sql), once a sweep owed for a restore is recorded (set_resync.sql).
UPDATE cdc_invalidator.slot_state_v1
SET recorded_in = 'cdc_invalidator.slot_state_v1'::regclass
WHERE recorded_in IS DISTINCT FROM 'cdc_invalidator.slot_state_v1'::regclass
