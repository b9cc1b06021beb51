-- Whether the DDL guard (event trigger, sql/logical.sql) is installed, enabled, and fires
-- for every command it guards (one made by an earlier release lacks the publication's).
SELECT EXISTS (SELECT FROM pg_event_trigger
               WHERE evtname = 'cdc_invalidator_guard' AND evtenabled <> 'D'
                 AND evttags @> ARRAY['ALTER TABLE', 'CREATE TABLE', 'ALTER PUBLICATION',
                                      'CREATE PUBLICATION', 'DROP PUBLICATION']) AS guarded
