-- `keys --where`: the template columns whose type (or a domain's base type) is cast to
-- text by a function other than PostgreSQL's own (CREATE CAST ... WITH FUNCTION, which
-- the type's owner may write): reading them as text would run that function as the
-- operator's role, a superuser's perhaps. Casts are not looked up by search_path.
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), p.oid::regprocedure::text
FROM pg_attribute a
-- (a domain's base type, through domains over domains: PostgreSQL casts a domain by it)
JOIN LATERAL (
    WITH RECURSIVE chain (oid, typtype, typbasetype) AS (
        SELECT t.oid, t.typtype, t.typbasetype FROM pg_type t WHERE t.oid = a.atttypid
        UNION ALL
        SELECT t.oid, t.typtype, t.typbasetype
        FROM chain h JOIN pg_type t ON t.oid = h.typbasetype WHERE h.typtype = 'd')
    SELECT h.oid FROM chain h WHERE h.typtype <> 'd') b ON true
JOIN pg_cast c ON c.castsource = b.oid
              AND c.casttarget = 'text'::regtype AND c.castfunc <> 0
JOIN pg_proc p ON p.oid = c.castfunc
WHERE a.attrelid = %(table)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attname = ANY (%(columns)s::text[])
  AND p.pronamespace <> 'pg_catalog'::regnamespace
ORDER BY a.attnum
