-- A logical slot of this name on this database, whoever's (after uninstall: one a listener
-- re-created, or one left when our schema is gone and nothing says whose it is), and who
-- streams it.
SELECT s.active_pid
FROM pg_replication_slots s
WHERE s.slot_name = %(slot)s
  AND s.database = current_database()
  AND s.slot_type = 'logical'
  AND s.plugin = 'pgoutput'
