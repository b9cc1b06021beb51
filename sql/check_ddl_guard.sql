-- Whether the DDL guard (event trigger, sql/logical.sql) is installed and enabled.
SELECT EXISTS (SELECT FROM pg_event_trigger
               WHERE evtname = 'cdc_invalidator_guard' AND evtenabled <> 'D') AS guarded
