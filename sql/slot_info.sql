-- The slot as the server sees it, and what we last recorded about it (read by column
-- name into capture.slot.SlotState, whose classify() holds the rules).
SELECT n.name AS slot_name,
       current_database() AS current_database,
       s.slot_name IS NOT NULL AS slot_exists,
       s.plugin,
       s.slot_type,
       s.database,
       s.active_pid,
       s.wal_status,
       s.restart_lsn::text AS restart_lsn,
       s.confirmed_flush_lsn::text AS confirmed_flush_lsn,
       st.acked_lsn::text AS acked_lsn,
       st.resync_reason,
       st.server_run,
       st.server_lineage,
       EXISTS (SELECT FROM cdc_invalidator.slot_state_v1 o
               WHERE o.recorded_in <> 'cdc_invalidator.slot_state_v1'::regclass
                  OR o.recorded_in_database <> cdc_invalidator.database_oid_v1()) AS restored,
       st.slot_name IS NOT NULL AS registered,
       coalesce(s.two_phase, false) AS two_phase,
       -- (a column from PostgreSQL 17 on: read by name, NULL before)
       to_jsonb(s) ->> 'invalidation_reason' AS invalidation_reason
FROM (SELECT %(slot)s::name AS name) n
LEFT JOIN pg_replication_slots s ON s.slot_name = n.name
LEFT JOIN cdc_invalidator.slot_state_v1 st ON st.slot_name = n.name
