-- `cdc-invalidator explain`, trigger mode: the queue rows of the tables whose templates
-- can produce the key (processed rows are kept for replay_history), oldest first, with
-- what is known of each: the writer's xid, the start of its transaction (enqueued_at),
-- its commit time where track_commit_timestamp records one, and whether the listener's
-- saved progress has passed it (its keys deleted: the queue records no time for that).
-- The json columns as text: the listener's own decoding reads them; `rows` (last): a
-- pack's size, NULL for one change.
SELECT q.id, q.schema_name, q.table_name, q.op, q.old_row::text, q.new_row::text,
       q.xid::text,
       q.enqueued_at,
       CASE WHEN current_setting('track_commit_timestamp')::bool
            THEN pg_xact_commit_timestamp(xid(q.xid)) END AS committed_at,
       pg_visible_in_snapshot(q.xid, s.snapshot)
           OR coalesce(pg_visible_in_snapshot(q.xid, s.window_end)
                       AND (q.xid, q.id) <= (s.after_xid, s.after_id), false) AS processed,
       q.rows
FROM cdc_invalidator.queue_v1 q CROSS JOIN cdc_invalidator.listener_state_v1 s
WHERE (q.schema_name, q.table_name) IN (
    SELECT * FROM unnest(%(schemas)s::text[], %(tables)s::text[]))
ORDER BY q.id
