-- The tables a partition belongs to, nearest first: a change the stream reports for a
-- partition is a change of the partitioned table the configuration names.
SELECT a.relid::oid
FROM pg_partition_ancestors(%(relid)s::oid::regclass) WITH ORDINALITY AS a(relid, depth)
WHERE a.relid <> %(relid)s::oid::regclass
ORDER BY a.depth
