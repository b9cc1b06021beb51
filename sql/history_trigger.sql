-- Replay, trigger mode: the queue rows written in the window (processed rows are kept
-- for replay_history; rows not processed yet are harmless to include).
SELECT id, schema_name, table_name, op, old_row, new_row
FROM cdc_invalidator.queue_v1
WHERE enqueued_at >= now() - make_interval(secs => %(seconds)s)
ORDER BY id
