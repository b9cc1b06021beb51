-- Before a logical slot is made: the oldest transaction that holds a transaction id,
-- anywhere on the server, has run for more than 1 s (on a busy server short ones always
-- run, and end before they matter) and, once the listener has begun to wait, began
-- before then (%(before)s: new ones the slot's statement would not wait for). Making the
-- slot waits for every such transaction to end (PostgreSQL builds the slot's first
-- snapshot from them), for as long as they last, and says nothing meanwhile. A prepared
-- transaction is one too, with no session (a review: two-phase commit held the slot
-- unnamed). Its start is given, not its age: the listener names each one once; and the
-- server's clock, for %(before)s. (A role without pg_read_all_stats sees other roles'
-- sessions without their transaction ids: then nothing is found of them.)
SELECT b.pid, b.gid, b.datname, b.usename,
       to_char(b.began AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' AS since,
       statement_timestamp() AS now
FROM (
    SELECT a.pid, NULL::text AS gid, a.datname::text, a.usename::text, a.xact_start AS began
    FROM pg_stat_activity a
    WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
    UNION ALL
    SELECT NULL, p.gid, p.database::text, p.owner::text, p.prepared
    FROM pg_prepared_xacts p
) b
WHERE b.began < now() - interval '1 second'
  AND b.began < coalesce(%(before)s::timestamptz, 'infinity')
ORDER BY b.began
LIMIT 1
