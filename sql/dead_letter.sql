INSERT INTO cdc_invalidator.dead_letter_v1
    (id, enqueued_at, schema_name, table_name, op, old_row, new_row, error)
VALUES (%(id)s, %(enqueued_at)s, %(schema_name)s, %(table_name)s, %(op)s,
        %(old_row)s::jsonb, %(new_row)s::jsonb, %(error)s)
ON CONFLICT (id) DO UPDATE SET error = EXCLUDED.error, failed_at = now()
