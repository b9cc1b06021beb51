-- Tables that carry our triggers but are not in the configuration: each one's name now
-- (NULL once dropped), the name its events carry, whether that name is configured, and
-- whether another table has it now (the table was renamed away and another took the
-- name: its events still invalidate; none took it: the configuration names the table
-- by its old name, which `check` reports as missing, with its new name).
SELECT (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = w.relid) AS live_name,
       quote_ident(w.schema_name) || '.' || quote_ident(w.table_name) AS events_name,
       EXISTS (SELECT FROM unnest(%(schemas)s::text[], %(names)s::text[]) AS t (s, n)
               WHERE (t.s, t.n) = (w.schema_name, w.table_name)) AS name_configured,
       to_regclass(quote_ident(w.schema_name) || '.' || quote_ident(w.table_name)) IS NOT NULL
           AS name_taken
FROM cdc_invalidator.watched_v1 w
WHERE w.relid::oid <> ALL (ARRAY(
    SELECT to_regclass(t)::oid FROM unnest(%(tables)s::text[]) t
    WHERE to_regclass(t) IS NOT NULL))
ORDER BY 2, 1
