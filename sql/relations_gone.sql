-- Of the relations the stream described and the listener resolved (relids: each seen
-- committed in the catalog then), those gone from it now: dropped, the drop committed.
-- And a WAL position past each such drop's commit record, and so past every change of
-- theirs (a drop holds its table's lock until it commits): once the stream is read past
-- it, none of their changes is left to decode.
SELECT coalesce(array_agg(r.relid::int8), '{}') AS gone,
       pg_catalog.pg_current_wal_insert_lsn() - '0/0'::pg_catalog.pg_lsn AS past
FROM unnest(%(relids)s::pg_catalog.oid[]) AS r(relid)
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = r.relid)
