-- How far behind the slot is: WAL written since the position the listener confirmed;
-- the WAL the server keeps for it, from its restart_lsn (further back than the
-- confirmed position while a long transaction anywhere on the server is open: decoding
-- must start before it); and whether that WAL is still there. And the oldest such
-- transaction open for over a second (as slot_blockers.sql), named, a prepared one by its gid (it has no
-- session: only COMMIT PREPARED or ROLLBACK PREPARED ends it): what a DBA must end to
-- free that WAL. (A role without pg_read_all_stats sees no transaction id in other
-- roles' sessions: then those are not named, and status says it cannot see them.)
SELECT s.slot_name IS NOT NULL AS slot_exists,
       (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint AS lag_bytes,
       (pg_current_wal_lsn() - s.restart_lsn)::bigint AS held_bytes,
       s.wal_status,
       s.active_pid,
       s.safe_wal_size,
       st.resync_reason,
       (SELECT count(*) FROM cdc_invalidator.dead_letter_v1) AS dead_letters,
       st.last_processed_at,
       st.events_processed,
       (SELECT CASE WHEN b.gid IS NULL
                    THEN format('pid %%s (user %%s, database %%s), open since %%s', b.pid,
                                b.usename, b.datname, b.since)
                    ELSE format('prepared transaction %%L (owner %%s, database %%s), prepared %%s',
                                b.gid, b.usename, b.datname, b.since)
               END
        FROM (
            SELECT a.pid, NULL::text AS gid, a.datname::text, a.usename::text,
                   a.xact_start AS began,
                   to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' AS since
            FROM pg_stat_activity a
            WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
            UNION ALL
            SELECT NULL, p.gid, p.database::text, p.owner::text, p.prepared,
                   to_char(p.prepared AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
            FROM pg_prepared_xacts p
        ) b
        WHERE b.began < now() - interval '1 second'
        ORDER BY b.began
        LIMIT 1) AS held_back_by,
       -- (whether this role sees the others' transactions: without it, status says so
       -- rather than that none is open)
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS sees_all_sessions
FROM cdc_invalidator.slot_state_v1 st
LEFT JOIN pg_replication_slots s ON s.slot_name = st.slot_name
WHERE st.slot_name = %(slot)s
