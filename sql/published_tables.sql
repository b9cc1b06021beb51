-- Every table an install recorded as published, with its key columns as then configured.
SELECT p.relid::oid, p.schema_name, p.table_name, p.columns, p.attnums
FROM cdc_invalidator.published_v1 p
