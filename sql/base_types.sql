-- The base type of each type given: a domain's (through domains over domains), any other
-- type's its own. Asked once per type a key column of a Relation message names that is
-- not built in (capture/text_casts.py); a domain's base type never changes.
WITH RECURSIVE walk (oid, base) AS (
    SELECT t.oid, t.oid FROM pg_type t WHERE t.oid = ANY (%(types)s::oid[])
    UNION ALL
    SELECT w.oid, t.typbasetype
    FROM walk w JOIN pg_type t ON t.oid = w.base
    WHERE t.typtype = 'd'
)
SELECT w.oid, w.base
FROM walk w JOIN pg_type t ON t.oid = w.base
WHERE t.typtype <> 'd'
