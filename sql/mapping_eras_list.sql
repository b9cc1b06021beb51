-- Where may_call.sql said so: the earlier mappings' replaced entries (schema.sql).
SELECT cdc_invalidator.mapping_eras_v1(%(mapping)s, %(record)s::jsonb, %(capture)s)
