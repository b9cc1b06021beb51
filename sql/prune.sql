-- Delete a chunk of queue rows that lie below the finished snapshot's xmin: their
-- transactions were all visible in it, so their keys are gone. In the same statement,
-- the saved snapshots (progress_v1) older than replay_history (%(keep_s)s seconds), all
-- but the newest of them: that one is where a replay window starting at the cutoff
-- begins (history_trigger.sql). A few rows each time, found by the index on `at`.
--
-- The chunk is the first rows in (xid, id) order past the last row the previous chunk
-- deleted (%(after_xid)s, %(after_id)s; 0 and 0 at first), found by the queue's index
-- from there. Not from the table's start: while any transaction of this database is
-- older than the deleted rows (a pg_dump, a report, a session idle in transaction),
-- vacuum cannot remove them, and a scan from the start read every one of them again at
-- each chunk, in the listener's loop (measured past 3M such rows, 14M being an hour at
-- 4,000 changes/s: 130 ms a chunk, against 1.3 ms past the last). Nothing is left
-- behind that bound: a row at or before it belongs to a transaction below an xmin
-- already pruned to, finished then, so no row comes there later, and the chunk that
-- set the bound took every row up to it. (The first chunk after the listener starts
-- reads from the table's start: 0.5 s past those 3M rows, once.)
--
-- Answers one row, the chunk's last (xid, id) and how many rows went, or none.
WITH old_progress AS (
    DELETE FROM cdc_invalidator.progress_v1
    WHERE at < (SELECT max(at) FROM cdc_invalidator.progress_v1
                WHERE at <= now() - make_interval(secs => %(keep_s)s))
),
gone AS (
    DELETE FROM cdc_invalidator.queue_v1
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM cdc_invalidator.queue_v1
        WHERE (xid, id) > (%(after_xid)s::xid8, %(after_id)s)
          AND xid < pg_snapshot_xmin(%(snapshot)s::pg_snapshot)
        ORDER BY xid, id
        LIMIT %(limit)s))
    RETURNING xid, id
)
SELECT xid::text::int8, id, count(*) OVER ()
FROM gone
ORDER BY xid DESC, id DESC
LIMIT 1
