-- Of these columns of a relation, the ones a Relation message lacks for good: generated
-- (a publication before PostgreSQL 18 carries none), or no live column of the relation
-- now (a generated column dropped since: its attname and attgenerated are gone). One
-- look-up per Relation message that lacks a column only an earlier mapping's templates
-- use, never per row.
SELECT n.name
FROM unnest(%(names)s::text[]) AS n(name)
WHERE NOT EXISTS (
  SELECT FROM pg_attribute a
  WHERE a.attrelid = %(relid)s::oid AND a.attname = n.name
    AND a.attgenerated = '' AND NOT a.attisdropped
)
