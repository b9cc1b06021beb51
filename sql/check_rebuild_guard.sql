-- Whether the rebuild guard (the event triggers of sql/rebuild_guard.sql) is installed
-- and fires ALWAYS (also in sessions with session_replication_role = replica): all seven.
SELECT count(*) = 7 AS guarded
FROM pg_event_trigger
WHERE evtname IN ('cdc_invalidator_rebuilt', 'cdc_invalidator_dropped',
                  'cdc_invalidator_parts_moved', 'cdc_invalidator_parts_dropped',
                  'cdc_invalidator_rewritten', 'cdc_invalidator_enum_labels',
                  'cdc_invalidator_enum_renamed')
  AND evtenabled = 'A'
