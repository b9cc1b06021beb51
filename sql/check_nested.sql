-- The configured tables that are a partition or an inheritance child, at any depth, of
-- another configured table, with that table. A row of the one is a row of the other,
-- and each change is captured under one name: trigger mode, the table a statement names
-- (its statement triggers alone fire; the parent's transition tables hold the child's
-- rows); logical mode, the child's relation. The other table's keys stay cached.
-- Run by `check`, and by install scripts inside refuse_nested.sql, with the configured
-- tables' qualified names as a text[].
WITH RECURSIVE configured (rel, name) AS (
    SELECT to_regclass(t)::oid, t FROM unnest({tables}) t
    WHERE to_regclass(t) IS NOT NULL
), up (child, rel) AS (
    SELECT c.rel, i.inhparent FROM configured c JOIN pg_inherits i ON i.inhrelid = c.rel
    UNION
    SELECT u.child, i.inhparent FROM up u JOIN pg_inherits i ON i.inhrelid = u.rel
)
SELECT child.name AS child, parent.name AS parent
FROM up
JOIN configured child ON child.rel = up.child
JOIN configured parent ON parent.rel = up.rel
ORDER BY 1, 2
