-- The replica identity of a table and of each of its partitions or inheritance children
-- (only tables that hold rows log them): the columns whose old values UPDATE and DELETE
-- send.
SELECT r.relid::regclass::text AS rel,
       c.relreplident,
       coalesce((SELECT array_agg(a.attname::text)
                 FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                 WHERE i.indrelid = r.relid
                   AND ((c.relreplident = 'd' AND i.indisprimary)
                        OR (c.relreplident = 'i' AND i.indisreplident))), '{}') AS covered
FROM (WITH RECURSIVE tree (relid) AS (
          SELECT %(table)s::regclass::oid
          UNION
          SELECT i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.relid)
      SELECT tree.relid FROM tree) r
JOIN pg_class c ON c.oid = r.relid
WHERE c.relkind = 'r' AND c.relpersistence <> 't'  -- (a temporary child is not published)
ORDER BY 1
