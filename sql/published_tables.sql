-- Every table an install recorded as published, with its key columns as then configured,
-- and, for one dropped since, a position past its drop (NULL: not dropped, or not yet
-- seen committed; read through to_jsonb: a schema of an earlier release has no such column).
SELECT p.relid::oid, p.schema_name, p.table_name, p.columns, p.attnums,
       (to_jsonb(p) ->> 'dropped_before')::pg_lsn - '0/0'::pg_lsn AS dropped_before
FROM cdc_invalidator.published_v1 p
