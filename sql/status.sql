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
-- Not visible in the finished snapshot: a transaction still running when it was taken
-- (its xip) and committed since, or begun after it (from its xmax). Each looked up by
-- the queue's index, not every row from its xmin: while one transaction stays open (idle
-- in transaction after a write, a batch job), that xmin stays where it began, and every
-- scrape of the metrics read every row queued since (measured: 25 ms past 180k
-- single-row changes, against 0.3 ms now; an hour at 4,000 changes/s is 14M, and the
-- collector's statement_timeout is 5 s). Nor the rows of one still running: they are
-- not visible here, but were read to find that out (fetch_batch.sql says what that cost).
LEFT JOIN LATERAL (
    SELECT r.xid, r.id, r.rows, r.enqueued_at
    FROM cdc_invalidator.queue_v1 r
    WHERE r.xid = ANY (ARRAY(SELECT x FROM pg_snapshot_xip(s.snapshot) x
                             WHERE pg_visible_in_snapshot(x, pg_current_snapshot())))
    UNION ALL
    SELECT r.xid, r.id, r.rows, r.enqueued_at
    FROM cdc_invalidator.queue_v1 r
    -- (A row above the current snapshot's xmax is not visible to this statement anyway.
    -- Bounded at both ends, the range is estimated small: with one end, a third of the
    -- table, and the planner read all of it.)
    WHERE r.xid >= pg_snapshot_xmax(s.snapshot)
      AND r.xid < pg_snapshot_xmax(pg_current_snapshot())
) q
    ON NOT coalesce(pg_visible_in_snapshot(q.xid, s.window_end)
                    AND (q.xid, q.id) <= (s.after_xid, s.after_id), false)
GROUP BY s.last_processed_at, s.events_processed
