-- The tables a partition (or inheritance child) belongs to now, nearest first, by name:
-- a change the stream reports for a partition of a table an install stopped watching
-- is rendered with that table's last installed templates (capture/relations.py).
WITH RECURSIVE up (relid, depth) AS (
    SELECT i.inhparent, 1 FROM pg_inherits i WHERE i.inhrelid = %(relid)s::oid
    UNION ALL
    SELECT i.inhparent, u.depth + 1 FROM up u JOIN pg_inherits i ON i.inhrelid = u.relid
    WHERE u.depth < 100
)
SELECT n.nspname::text, c.relname::text
FROM up u
JOIN pg_class c ON c.oid = u.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY u.depth, u.relid
