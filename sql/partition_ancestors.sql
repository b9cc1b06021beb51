-- The tables a partition belongs to, nearest first: a change the stream reports for a
-- partition is a change of the partitioned table the configuration names.
SELECT n.nspname, c.relname
FROM pg_partition_ancestors(%(relid)s::oid::regclass) WITH ORDINALITY AS a(relid, depth)
JOIN pg_class c ON c.oid = a.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.relid <> %(relid)s::oid::regclass
ORDER BY a.depth
