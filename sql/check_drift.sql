-- What became of a configured table since install recorded it (published_v1): the name
-- its relation has now (NULL: dropped), whether the configured name still names it (or
-- names another table now: renamed away and another made in its place), and
-- each key column as configured, as it is named now (NULL: dropped), and whether another
-- column took its configured name since (which logical mode then follows).
SELECT CASE WHEN c.oid IS NOT NULL THEN p.relid::regclass::text END AS now_name,
       to_regclass(%(qualified)s) IS NOT DISTINCT FROM p.relid AS same,
       to_regclass(%(qualified)s) IS NOT NULL AS name_taken,
       ARRAY(SELECT ARRAY[k.name, (SELECT a.attname::text FROM pg_attribute a
                                   WHERE a.attrelid = p.relid AND a.attnum = k.attnum
                                     AND NOT a.attisdropped),
                          (SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = p.relid AND a.attname = k.name
                             AND a.attnum <> k.attnum AND NOT a.attisdropped)]
             FROM unnest(p.columns, p.attnums) AS k(name, attnum)) AS columns
FROM cdc_invalidator.published_v1 p
LEFT JOIN pg_class c ON c.oid = p.relid
WHERE (p.schema_name, p.table_name) = (%(schema)s, %(name)s)
  AND to_regclass('cdc_invalidator.published_v1') IS NOT NULL
