-- Whether our SQL is installed at all (before asking which version), and whether it has
-- a revision (revision 1 had none).
SELECT to_regprocedure('cdc_invalidator.schema_version()') IS NOT NULL AS installed,
       to_regprocedure('cdc_invalidator.schema_revision()') IS NOT NULL AS revised
