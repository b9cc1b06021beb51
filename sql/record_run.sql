-- Logical mode, at each connect: the server's run (server_run_v1() in schema.sql)
-- recorded for the slot, once a sweep it owes is recorded (set_resync.sql).
UPDATE cdc_invalidator.slot_state_v1 SET server_run = %(run)s
WHERE slot_name = %(slot)s AND server_run IS DISTINCT FROM %(run)s
