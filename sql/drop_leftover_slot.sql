-- A slot left from an earlier slot_name (leftover_slots.sql), dropped only if it still is
-- what was judged droppable: on this database, pgoutput, nobody streams it, and not moved
-- past the last position our listener saved for it (%(acked)s, read with it: uninstall
-- drops such slots after our schema is gone). A walsender that takes it meanwhile makes
-- the drop fail: "is active for PID".
SELECT pg_drop_replication_slot(s.slot_name)
FROM pg_replication_slots s
WHERE s.slot_name = %(slot)s
  AND s.database = current_database()
  AND s.slot_type = 'logical'
  AND s.plugin = 'pgoutput'
  AND NOT coalesce(s.two_phase, false)
  AND s.active_pid IS NULL
  AND s.confirmed_flush_lsn <= %(acked)s::pg_lsn
