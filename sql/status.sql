-- Backlog: changes of committed transactions that the listener has not acknowledged yet
-- (not visible in its finished snapshot, nor done in the window it is working through);
-- a pack (a statement's rows in one queue row) counts its rows.
SELECT
    coalesce(sum(coalesce(q.rows, 1)) FILTER (WHERE q.id IS NOT NULL), 0)::int8 AS backlog,
    extract(epoch FROM now() - min(q.enqueued_at))::float8 AS oldest_pending_age_s,
    (SELECT count(*) FROM cdc_invalidator.dead_letter_v1) AS dead_letters,
    s.last_processed_at,
    s.events_processed,
    -- NOTIFY's queue is shared by the whole server; once full, commits that NOTIFY fail.
    pg_notification_queue_usage() AS notify_queue_usage
FROM cdc_invalidator.listener_state_v1 s
LEFT JOIN cdc_invalidator.queue_v1 q
    ON q.xid >= pg_snapshot_xmin(s.snapshot)
   AND NOT pg_visible_in_snapshot(q.xid, s.snapshot)
   AND NOT coalesce(pg_visible_in_snapshot(q.xid, s.window_end)
                    AND (q.xid, q.id) <= (s.after_xid, s.after_id), false)
GROUP BY s.last_processed_at, s.events_processed
