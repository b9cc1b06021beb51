-- Park an event of the logical stream (negative ids: it has no queue id).
INSERT INTO cdc_invalidator.dead_letter_v1
    (id, schema_name, table_name, op, old_row, new_row, error)
VALUES (-nextval('cdc_invalidator.logical_dead_letter_v1'), %(schema)s, %(table)s, %(op)s,
        %(old)s::json, %(new)s::json, %(error)s)
