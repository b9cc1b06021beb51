-- Logical mode, at each connect: the server's run (server_run_v1() in schema.sql) and its
-- lineage (server_lineage_v1()) recorded for the slot, once a sweep it owes is recorded
-- (set_resync.sql). NULL (withheld): the one recorded is kept.
UPDATE cdc_invalidator.slot_state_v1
SET server_run = coalesce(%(run)s, server_run),
    server_lineage = coalesce(%(lineage)s, server_lineage)
WHERE slot_name = %(slot)s
  AND (server_run IS DISTINCT FROM coalesce(%(run)s, server_run)
       OR server_lineage IS DISTINCT FROM coalesce(%(lineage)s, server_lineage))
