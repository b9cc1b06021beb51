-- Before a logical slot is made: the oldest transaction that holds a transaction id,
-- anywhere on the server, that has run for more than 1 s (on a busy server short ones
-- always run, and end before they matter) and, once the listener has begun to wait, got
-- its id before then (%(before)s: the next id then, the ones the slot's statement would
-- have waited for, and no later one, which it would not). Making the slot waits for
-- every such transaction to end (PostgreSQL builds the slot's first snapshot from them),
-- for as long as they last, and says nothing meanwhile. A prepared transaction is one
-- too, with no session (a review: two-phase commit held the slot unnamed), by its id,
-- whenever it was prepared. Its start is given, not its age: the listener names each one
-- once; and the next id, for %(before)s. (A role without pg_read_all_stats sees other
-- roles' sessions without their transaction ids: then nothing is found of them.)
--
-- Ids are compared by age() alone, which counts back from one point (the next id to be
-- given, read once per transaction): the next id is an id plus its age, and an id is
-- older than %(before)s when its age is the greater. Counting from the snapshot's xmax
-- instead (the id after the last one to end, behind the next id by every one still
-- running) took an id given after the listener began to wait for one before it, while
-- later ones ran: CI, and the loop's wait would not end while such ones overlapped.
-- (32 bits, as age() has them: a wait would have to outlast 2^31 ids to be misread.)
SELECT b.pid, b.gid, b.datname, b.usename,
       to_char(b.began AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' AS since,
       coalesce(%(before)s::bigint, (b.id::text::bigint + age(b.id)) %% 4294967296) AS before
FROM (
    SELECT a.pid, NULL::text AS gid, a.datname::text, a.usename::text,
           a.xact_start AS began, a.backend_xid AS id
    FROM pg_stat_activity a
    WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
    UNION ALL
    SELECT NULL, p.gid, p.database::text, p.owner::text, p.prepared, p.transaction
    FROM pg_prepared_xacts p
) b
-- (Once waiting, any of those: one prepared a moment ago is one the listener waited for.)
WHERE (b.began < now() - interval '1 second' OR %(before)s::bigint IS NOT NULL)
  AND (%(before)s::bigint IS NULL OR age(b.id) > age(%(before)s::bigint::text::xid))
ORDER BY b.began
LIMIT 1
