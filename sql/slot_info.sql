-- The slot as the server sees it, and what we last recorded about it.
SELECT s.slot_name IS NOT NULL AS slot_exists, s.plugin, s.slot_type, s.database,
       s.active_pid, s.wal_status, s.restart_lsn::text, s.confirmed_flush_lsn::text,
       st.acked_lsn::text, st.resync_reason, st.slot_name IS NOT NULL AS state_exists
FROM (SELECT %(slot)s::name AS name) n
LEFT JOIN pg_replication_slots s ON s.slot_name = n.name
LEFT JOIN cdc_invalidator.slot_state_v1 st ON st.slot_name = n.name
