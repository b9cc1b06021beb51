-- The names key columns have now, by number (dropped ones are left out): one look-up per
-- Relation message of a configured table, never per row.
SELECT a.attnum, a.attname::text
FROM pg_attribute a
WHERE a.attrelid = %(relid)s::oid AND a.attnum = ANY (%(attnums)s::int2[]) AND NOT a.attisdropped
