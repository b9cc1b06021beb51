-- The earlier mappings' templates that the listener's mapping replaced, and the queue
-- ids each captured (sql/schema.sql, mapping_eras_v1()); NULL where the installed schema
-- has no such function (an earlier release's, of revision 10) or EXECUTE on it is not
-- ours: their rows are rendered with the listener's templates only, as before.
SELECT CASE WHEN to_regprocedure('cdc_invalidator.mapping_eras_v1(text, jsonb, text)') IS NOT NULL
             AND has_function_privilege('cdc_invalidator.mapping_eras_v1(text, jsonb, text)', 'EXECUTE')
            THEN true END
