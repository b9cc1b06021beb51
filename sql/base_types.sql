-- The base type of each type given: a domain's (through domains over domains), any other
-- type's its own. Asked once per type a key column of a Relation message names that is
-- not built in (capture/text_casts.py); a domain's base type never changes. A base type
-- cast to text by a function other than PostgreSQL's own (CREATE CAST ... WITH FUNCTION:
-- `::text` runs it, in trigger mode's capture function; pgoutput sends the output
-- function's text) is given as 0 (text_casts.OWN_CAST): logical mode cannot render its
-- `::text`, and sweeps instead. Casts apply to a domain's base type, as `::text` does.
WITH RECURSIVE walk (oid, base) AS (
    SELECT t.oid, t.oid FROM pg_type t WHERE t.oid = ANY (%(types)s::oid[])
    UNION ALL
    SELECT w.oid, t.typbasetype
    FROM walk w JOIN pg_type t ON t.oid = w.base
    WHERE t.typtype = 'd'
)
SELECT w.oid,
       CASE WHEN EXISTS (
                SELECT FROM pg_cast c JOIN pg_proc p ON p.oid = c.castfunc
                WHERE c.castsource = w.base AND c.casttarget = 'text'::regtype
                  AND p.pronamespace <> 'pg_catalog'::regnamespace)
            THEN 0 ELSE w.base END
FROM walk w JOIN pg_type t ON t.oid = w.base
WHERE t.typtype <> 'd'
