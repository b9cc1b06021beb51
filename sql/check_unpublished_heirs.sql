-- The inheritance children of a configured plain table (at any depth; not those
-- configured on their own, nor theirs: `tables`) that its publication does not hold:
-- made, or made to inherit, after install. Their changes, whichever table a statement
-- names, are not decoded until install publishes them. (Temporary, unlogged and foreign
-- ones cannot be published: publication_drift_v1() names those.)
WITH RECURSIVE skip AS (
    SELECT coalesce(array_agg(to_regclass(t)::oid), '{}') AS rels
    FROM unnest(%(tables)s::text[]) t WHERE to_regclass(t) IS NOT NULL
), heirs (rel) AS (
    SELECT i.inhrelid FROM skip, pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
    WHERE i.inhparent = to_regclass(%(table)s) AND c.relkind = 'r'
      AND i.inhrelid <> ALL (skip.rels)
    UNION
    SELECT i.inhrelid FROM skip, heirs h JOIN pg_inherits i ON i.inhparent = h.rel
    WHERE i.inhrelid <> ALL (skip.rels)
)
SELECT format('%%I.%%I', n.nspname, c.relname)
FROM heirs h JOIN pg_class c ON c.oid = h.rel JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p'
  AND NOT EXISTS (SELECT FROM pg_publication_rel pr
                  JOIN pg_publication p ON p.oid = pr.prpubid AND p.pubname = %(publication)s
                  WHERE pr.prrelid = h.rel)
ORDER BY 1
