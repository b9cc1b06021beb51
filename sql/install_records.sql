-- Before install: which of an earlier install's records the installing role may read
-- (trigger mode's watched_v1, logical mode's published_v1, and mapping_v1:
-- removed_unrecorded.sql). None where it may not use the schema: to_regclass() would
-- fail there (CASE, since AND does not promise to look at its left side first), before
-- install's own guard refuses that role with its reason.
SELECT CASE WHEN u THEN coalesce(has_table_privilege(
                 to_regclass('cdc_invalidator.watched_v1'), 'SELECT'), false) ELSE false END,
       CASE WHEN u THEN coalesce(has_table_privilege(
                 to_regclass('cdc_invalidator.published_v1'), 'SELECT'), false) ELSE false END,
       CASE WHEN u THEN coalesce(has_table_privilege(
                 to_regclass('cdc_invalidator.mapping_v1'), 'SELECT'), false) ELSE false END
FROM (SELECT EXISTS (SELECT FROM pg_namespace n
                     WHERE n.nspname = 'cdc_invalidator'
                       AND has_schema_privilege(n.oid, 'USAGE')) AS u) s
