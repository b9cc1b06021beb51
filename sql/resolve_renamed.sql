-- A queue row's table that the listener's mapping does not name: the watched tables
-- whose events carried that name, with their names now, as install recorded them, and
-- the names their events carried before (watched_v1.renamed_from, newest last), each
-- as [schema, table]. The capture function queues under the name compiled in by the
-- last install, which a rename does not change: after one, the configuration names the
-- table by its new name while rows still carry the old one (capture/trigger_queue.py,
-- Renames). renamed_from is read through to_jsonb(): an install of an earlier release
-- has no such column, and a table never renamed has NULL there: '[]' for both.
SELECT n.nspname::text, c.relname::text, w.schema_name, w.table_name,
       coalesce(nullif(to_jsonb(w) -> 'renamed_from', 'null'), '[]')::text
FROM cdc_invalidator.watched_v1 w
-- (a table dropped since has no name now: its sweep, queued by the drop under the
-- recorded name, is still mapped by a name it had)
LEFT JOIN pg_class c ON c.oid = w.relid
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE (w.schema_name, w.table_name) = (%(schema)s, %(name)s)
   OR (to_jsonb(w) -> 'renamed_from')
      @> jsonb_build_array(jsonb_build_array(%(schema)s::text, %(name)s::text))
-- The table that carries the name now first, then the one that carried it last.
ORDER BY (w.schema_name, w.table_name) = (%(schema)s, %(name)s) DESC, w.watched_at DESC
