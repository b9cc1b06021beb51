-- NULL when the schema is missing, else the version of the installed SQL.
SELECT CASE WHEN to_regprocedure('cdc_invalidator.schema_version()') IS NULL THEN NULL
            ELSE cdc_invalidator.schema_version() END AS version
