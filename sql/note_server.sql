-- Trigger mode, at each connect: this server's lineage and run noted, and a sweep of every
-- watched table queued if it is another server than the one the listener last ran on, or
-- than the one its previous session saw, or came up from a crash since (where
-- %(sweep_crashed)s), or was restored from a dump or copied from another database:
-- note_server_v3() in schema.sql says why.
SELECT previous, current, swept, run_before, run, restored
FROM cdc_invalidator.note_server_v3(%(sweep)s, %(seen)s, %(sweep_crashed)s)
