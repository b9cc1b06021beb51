-- Our slot (registered in slot_state_v1 of this database) if it exists, and who streams it.
SELECT s.active_pid
FROM pg_replication_slots s
WHERE s.slot_name = %(slot)s
  AND s.database = current_database()
  AND s.plugin = 'pgoutput'
  AND to_regclass('cdc_invalidator.slot_state_v1') IS NOT NULL
