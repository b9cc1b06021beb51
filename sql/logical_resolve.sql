-- A configured table at listener start: its relation and its key columns' numbers. The
-- relation install recorded for that name wins (the table may have been renamed since);
-- else the one the name resolves to now. A column's recorded number wins over a look-up
-- by name (it may have been renamed since). NULL: no such column (any more).
WITH live AS (
    SELECT to_regclass(%(qualified)s)::oid AS relid
), rec AS (
    SELECT p.relid::oid AS relid, p.columns, p.attnums
    FROM cdc_invalidator.published_v1 p
    JOIN pg_class c ON c.oid = p.relid
    WHERE (p.schema_name, p.table_name) = (%(schema)s, %(name)s)
       OR p.relid::oid = (SELECT relid FROM live)
    -- The record of this name first (of the relation the name is now, if two have it:
    -- one renamed away, one that took the name), then the record of the relation the
    -- name is now.
    ORDER BY (p.schema_name, p.table_name) = (%(schema)s, %(name)s) DESC,
             p.relid::oid = (SELECT relid FROM live) DESC
    LIMIT 1
), target AS (
    SELECT coalesce((SELECT relid FROM rec), (SELECT relid FROM live)) AS relid
)
SELECT t.relid,
       ARRAY(SELECT coalesce(
                    (SELECT r.attnums[array_position(r.columns, k.name)]
                     FROM rec r
                     JOIN pg_attribute a ON a.attrelid = r.relid
                      AND a.attnum = r.attnums[array_position(r.columns, k.name)]
                      AND NOT a.attisdropped),
                    (SELECT a.attnum FROM pg_attribute a
                     WHERE a.attrelid = t.relid AND a.attname = k.name
                       AND a.attnum > 0 AND NOT a.attisdropped))
             FROM unnest(%(columns)s::text[]) WITH ORDINALITY AS k(name, ord)
             ORDER BY k.ord) AS attnums
FROM target t
