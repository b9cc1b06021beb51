-- Key columns of a configured table that are generated columns: before PostgreSQL 18 no
-- publication carries one, so logical mode cannot render them.
SELECT array_agg(a.attname::text ORDER BY a.attnum)
FROM pg_attribute a
WHERE a.attrelid = to_regclass(%(table)s) AND a.attname = ANY (%(columns)s::text[])
  AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> ''
