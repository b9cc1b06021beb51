-- Of these columns of a relation, the generated ones (a publication before PostgreSQL 18
-- carries none, so a Relation message lacks them): one look-up per Relation message
-- that lacks a column only an earlier mapping's templates use, never per row.
SELECT a.attname::text
FROM pg_attribute a
WHERE a.attrelid = %(relid)s::oid AND a.attname = ANY (%(names)s::text[])
  AND a.attgenerated <> '' AND NOT a.attisdropped
