-- logical_resolve.sql for an install older than published_v1: by name only.
SELECT to_regclass(%(qualified)s)::oid,
       ARRAY(SELECT (SELECT a.attnum FROM pg_attribute a
                     WHERE a.attrelid = to_regclass(%(qualified)s) AND a.attname = k.name
                       AND a.attnum > 0 AND NOT a.attisdropped)
             FROM unnest(%(columns)s::text[]) WITH ORDINALITY AS k(name, ord)
             ORDER BY k.ord)
