-- Whether our SQL is installed at all (before asking which version).
SELECT to_regprocedure('cdc_invalidator.schema_version()') IS NOT NULL AS installed
