-- Second deletes a listener that stopped may have owed (trigger mode): the rows of
-- history_trigger.sql's window (their keys deleted in the last %(seconds)s seconds, or
-- not yet) that it had processed: visible in the snapshot it finished last, or in the
-- window it was reading, up to its position there (listener_state_v1, as fetch_batch.sql
-- reads it). The rows not processed yet are the next listener's to delete, each with its
-- own second delete: a backlog that waited through an outage is not deleted twice (the
-- first time before the next listener's first batch, which it held back).
WITH start AS MATERIALIZED (
    SELECT (SELECT snapshot FROM cdc_invalidator.progress_v1
            WHERE at <= now() - make_interval(secs => %(seconds)s)
            ORDER BY at DESC LIMIT 1) AS snapshot
), state AS MATERIALIZED (
    SELECT snapshot, window_end, after_xid, after_id FROM cdc_invalidator.listener_state_v1
)
SELECT q.id, q.schema_name, q.table_name, q.op, q.old_row::text, q.new_row::text, q.rows
FROM cdc_invalidator.queue_v1 q, state s
WHERE q.xid >= (SELECT coalesce(pg_snapshot_xmin(snapshot), '0'::xid8) FROM start)
  -- Nothing processed is past both snapshots' xmax: the index's upper bound too (a
  -- backlog queued since is not read at all), as a subquery so that the planner takes
  -- it as one value, whatever plan it picks for the join.
  AND q.xid < (SELECT greatest(pg_snapshot_xmax(snapshot), pg_snapshot_xmax(window_end))
               FROM state)
  AND NOT coalesce(pg_visible_in_snapshot(q.xid, (SELECT snapshot FROM start)), false)
  AND (pg_visible_in_snapshot(q.xid, s.snapshot)
       OR coalesce(pg_visible_in_snapshot(q.xid, s.window_end)
                   AND (q.xid, q.id) <= (s.after_xid, s.after_id), false))
ORDER BY q.id
