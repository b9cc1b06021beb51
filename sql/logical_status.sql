-- How far behind the slot is: WAL written since the position the listener confirmed;
-- the WAL the server keeps for it, from its restart_lsn (further back than the
-- confirmed position while a long transaction anywhere on the server is open: decoding
-- must start before it); and whether that WAL is still there.
SELECT s.slot_name IS NOT NULL AS slot_exists,
       (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint AS lag_bytes,
       (pg_current_wal_lsn() - s.restart_lsn)::bigint AS held_bytes,
       s.wal_status,
       s.active_pid,
       s.safe_wal_size,
       st.resync_reason,
       (SELECT count(*) FROM cdc_invalidator.dead_letter_v1) AS dead_letters,
       st.last_processed_at,
       st.events_processed
FROM cdc_invalidator.slot_state_v1 st
LEFT JOIN pg_replication_slots s ON s.slot_name = st.slot_name
WHERE st.slot_name = %(slot)s
