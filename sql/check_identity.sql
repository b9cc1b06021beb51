-- The replica identity of a table and of each of its partitions (only tables that hold
-- rows log them): the columns whose old values UPDATE and DELETE send.
SELECT r.relid::regclass::text AS rel,
       c.relreplident,
       coalesce((SELECT array_agg(a.attname::text)
                 FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                 WHERE i.indrelid = r.relid
                   AND ((c.relreplident = 'd' AND i.indisprimary)
                        OR (c.relreplident = 'i' AND i.indisreplident))), '{}') AS covered
FROM (SELECT %(table)s::regclass AS relid
      UNION SELECT p.relid FROM pg_partition_tree(%(table)s::regclass) p) r
JOIN pg_class c ON c.oid = r.relid
WHERE c.relkind = 'r'
ORDER BY 1
