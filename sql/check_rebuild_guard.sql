-- Whether the rebuild guard (trigger mode's event triggers, sql/rebuild_guard.sql) is
-- installed and enabled: both of its event triggers.
SELECT count(*) = 2 AS guarded
FROM pg_event_trigger
WHERE evtname IN ('cdc_invalidator_rebuilt', 'cdc_invalidator_dropped') AND evtenabled <> 'D'
