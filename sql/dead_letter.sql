-- Park an event with the error that stopped it, copied verbatim from the queue (a pack
-- whole: its error names the elements that failed).
INSERT INTO cdc_invalidator.dead_letter_v1
    (id, enqueued_at, schema_name, table_name, op, old_row, new_row, rows, error)
SELECT id, enqueued_at, schema_name, table_name, op, old_row, new_row, rows, %(error)s
FROM cdc_invalidator.queue_v1
WHERE xid = %(xid)s::xid8 AND id = %(id)s
ON CONFLICT (id) DO UPDATE SET error = EXCLUDED.error, failed_at = now()
