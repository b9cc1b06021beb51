-- Logical mode, a sweep of every watched table (changes may have been missed): whether
-- to ask for the tables installed mappings named (sql/schema.sql, retired_tables_v1()):
-- NULL where the installed schema has no such function (an earlier release's, of
-- revision 10) or EXECUTE on it was revoked by hand: those tables are not swept then.
SELECT CASE WHEN to_regprocedure('cdc_invalidator.retired_tables_v1()') IS NOT NULL
             AND has_function_privilege('cdc_invalidator.retired_tables_v1()', 'EXECUTE')
            THEN true END
