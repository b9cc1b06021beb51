-- Slots recorded as ours (slot_state_v1: install or the listener created them) that still
-- exist on this database with our plugin, other than the configured one: left behind
-- when slot_name changed. Nothing of ours consumes them, and each keeps WAL until it is
-- dropped. Read by name into capture.logical_sql.Leftover, whose droppable says which
-- install may drop.
SELECT s.slot_name::text AS slot_name,
       s.active_pid,
       s.wal_status,
       coalesce(s.two_phase, false) AS two_phase,
       pg_wal_lsn_diff(
           CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                ELSE pg_current_wal_lsn() END,
           s.restart_lsn)::bigint AS held_bytes,
       s.confirmed_flush_lsn::text AS confirmed_flush_lsn,
       st.acked_lsn::text AS acked_lsn
FROM pg_replication_slots s
JOIN cdc_invalidator.slot_state_v1 st ON st.slot_name = s.slot_name
WHERE s.database = current_database()
  AND s.slot_type = 'logical'
  AND s.plugin = 'pgoutput'
  AND s.slot_name IS DISTINCT FROM %(slot)s  -- (NULL: trigger mode, which uses none)
ORDER BY s.slot_name
