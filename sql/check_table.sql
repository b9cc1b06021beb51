-- Whether a configured table exists, and its columns.
SELECT
    to_regclass(%(table)s) IS NOT NULL AS table_exists,
    ARRAY(SELECT a.attname::text FROM pg_attribute a
          WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0 AND NOT a.attisdropped)
        AS columns
