-- Before install: the tables an earlier install watched (trigger mode's watched_v1) or
-- published (logical mode's published_v1: the records placeholder) that the configuration no longer
-- names (by relation, as check_unconfigured.sql), and whether a recorded mapping holds
-- their templates (the recorded placeholder: removed_recorded.sql, or false where there is
-- no mapping_v1).
SELECT quote_ident(r.schema_name) || '.' || quote_ident(r.table_name) AS name,
       {recorded} AS recorded
FROM {records} r
WHERE r.relid::oid <> ALL (ARRAY(
    SELECT to_regclass(t)::oid FROM unnest(%(tables)s::text[]) t
    WHERE to_regclass(t) IS NOT NULL))
