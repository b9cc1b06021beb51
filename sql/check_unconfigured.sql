-- Tables that carry our triggers but are not in the configuration.
SELECT w.relid::text
FROM cdc_invalidator.watched_v1 w
WHERE w.relid::oid <> ALL (ARRAY(
    SELECT to_regclass(t)::oid FROM unnest(%(tables)s::text[]) t
    WHERE to_regclass(t) IS NOT NULL))
ORDER BY 1
