-- The tables a partition belongs to, or an inheritance child inherits from, nearest
-- first: a change the stream reports for either is a change of the table the
-- configuration names (install publishes a configured plain table's inheritance
-- children under their own names). From pg_inherits: pg_partition_ancestors() knows no
-- inheritance.
WITH RECURSIVE up (relid, depth) AS (
    SELECT i.inhparent, 1 FROM pg_inherits i WHERE i.inhrelid = %(relid)s::oid
    UNION ALL
    SELECT i.inhparent, u.depth + 1 FROM up u JOIN pg_inherits i ON i.inhrelid = u.relid
    WHERE u.depth < 100
)
SELECT u.relid::oid
FROM up u
ORDER BY u.depth, u.relid
