-- Partitions, at any depth, of configured partitioned tables that members_v1 does not
-- record: made while the rebuild guard was disabled or not installed. Their DROP or
-- DETACH is not swept until install, or the next ATTACH/DETACH in their tree, records
-- them. Only tables install took in (watched, or in a publication), so that a table not
-- installed yet is not named twice. At most ten names per table (and their count).
WITH RECURSIVE roots AS (
    SELECT c.oid AS root
    FROM unnest(%(tables)s::text[]) AS t (name)
    JOIN pg_class c ON c.oid = to_regclass(t.name)
    WHERE c.relkind = 'p'
      -- (watched: our capture trigger on it, read from the catalog, which the listener's
      -- role may read in either mode; published)
      AND (EXISTS (SELECT FROM pg_trigger tg
                   WHERE tg.tgrelid = c.oid AND tg.tgname = 'cdc_invalidator_ins_v1')
           OR EXISTS (SELECT FROM pg_publication_rel pr WHERE pr.prrelid = c.oid))
), tree (root, rel) AS (
    SELECT r.root, i.inhrelid FROM roots r JOIN pg_inherits i ON i.inhparent = r.root
    UNION ALL
    SELECT t.root, i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.rel
), unrecorded AS (
    SELECT t.root, format('%%I.%%I', n.nspname, c.relname) AS label
    FROM tree t JOIN pg_class c ON c.oid = t.rel JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE NOT EXISTS (SELECT FROM cdc_invalidator.members_v1 m
                      WHERE m.part = t.rel::regclass AND m.root = t.root::regclass)
)
SELECT format('%%I.%%I', n.nspname, c.relname) AS root,
       count(*) AS unrecorded,
       (array_agg(u.label ORDER BY u.label))[1:10] AS parts
FROM unrecorded u JOIN pg_class c ON c.oid = u.root JOIN pg_namespace n ON n.oid = c.relnamespace
GROUP BY 1
ORDER BY 1
