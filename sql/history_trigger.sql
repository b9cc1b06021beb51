-- Replay, trigger mode: the queue rows written in the window (processed rows are kept
-- for replay_history; rows not processed yet are harmless to include). The json
-- columns as text: the listener's own decoding reads them (a value the driver cannot
-- parse would fail the whole read). `rows`: a pack's size (NULL: one change).
SELECT id, schema_name, table_name, op, old_row::text, new_row::text, rows
FROM cdc_invalidator.queue_v1
WHERE enqueued_at >= now() - make_interval(secs => %(seconds)s)
ORDER BY id
