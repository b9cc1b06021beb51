-- A relation's column names now, in column order (dropped ones left out): compared with
-- a Relation message's, which are as they were when its change was made. Only when a key
-- column's two candidate names are both in the message (capture/logical.py).
SELECT a.attname::text
FROM pg_attribute a
WHERE a.attrelid = %(relid)s::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
