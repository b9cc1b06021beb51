-- Whether the DDL guard (event triggers, sql/logical.sql) is installed, enabled, and fires
-- for every command it guards (one made by an earlier release lacks some).
SELECT count(*) = 3 AS guarded
FROM pg_event_trigger
WHERE evtenabled <> 'D'
  AND ((evtname = 'cdc_invalidator_guard'
        AND evttags @> ARRAY['ALTER TABLE', 'CREATE TABLE', 'CREATE FOREIGN TABLE',
                             'ALTER PUBLICATION', 'CREATE PUBLICATION', 'DROP PUBLICATION'])
       OR (evtname = 'cdc_invalidator_guard_drops'
           AND evttags @> ARRAY['ALTER PUBLICATION', 'DROP PUBLICATION'])
       OR (evtname = 'cdc_invalidator_guard_index' AND evttags IS NULL))
