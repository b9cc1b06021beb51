-- The next events to invalidate, in (xid, id) order: rows of transactions visible in
-- the window's end snapshot (given, or NULL to take one now) but not in the snapshot the
-- listener finished last (given as its in-flight ids and its xmax). A large window is
-- taken in chunks, each after the last (xid, id) done. A chunk holds up to %(limit)s
-- events, not rows: a pack (queue_v1.rows, NULL for one change) weighs its rows, and a
-- row is taken only while the events before it are fewer than the limit (so a chunk
-- exceeds the limit by less than one pack, and always holds at least one row). A chunk
-- with fewer events than the limit took every row the window had left.
-- (Every row weighs at least 1, whatever a hand-written `rows` says: that is what makes
-- the last sentence true. The decoder dead-letters a pack whose arrays disagree.)
--
-- One header row, then the chunk's rows. The header (its first column not NULL) carries
-- what the chunk has once: the window's end snapshot, how many rows the chunk has, its
-- last (xid, id), where the next chunk starts, and each transaction's age. The reader
-- finds it by that column, wherever it comes, and takes the position from it, never
-- from the order the rows arrive in. Per row, only what an event needs: a snapshot or
-- an age repeated on each of 5,000 rows cost more than the rows' own columns
-- (measured: 280 ms for 100k rows with them, 120 ms without).
-- Rows are returned as JSON text: the listener parses them itself, so that one
-- malformed row becomes a dead letter instead of failing the batch in the driver.
WITH w AS (SELECT coalesce(%(cur)s::pg_snapshot, pg_current_snapshot()) AS cur),
chunk AS MATERIALIZED (
    SELECT * FROM (
    -- Only the rows taken are returned, and their json read (a pack is TOASTed: the
    -- rows past the limit cost their index entry and tuple, not their payload).
    SELECT q.*, sum(q.events) OVER (ORDER BY q.xid, q.id) - q.events AS before
    FROM w, LATERAL (
        -- Transactions that were still running when the last snapshot was taken, and
        -- are visible in this one: only theirs are looked up. (A transaction still
        -- running has its rows read by none of these reads: a batch job's one long
        -- transaction of 200k single-row statements cost each read 18 ms, one with 2M
        -- ten times that. The position is a filter here, not an index bound: the rows of
        -- the transactions that ended since the last snapshot are few.)
        (SELECT r.xid, r.id, r.pid, r.enqueued_at, r.schema_name, r.table_name, r.op, r.old_row, r.new_row,
                r.rows, greatest(r.rows, 1) AS events
         FROM cdc_invalidator.queue_v1 r
         WHERE r.xid = ANY (ARRAY(SELECT x FROM unnest(%(prev_xip)s::xid8[]) x
                                  WHERE pg_visible_in_snapshot(x, w.cur)))
           AND (r.xid > %(after_xid)s::xid8
                OR (r.xid = %(after_xid)s::xid8 AND r.id > %(after_id)s))
         ORDER BY r.xid, r.id
         LIMIT %(limit)s)
        UNION ALL
        -- Transactions that started after it: from (its xmax, 0) or the position, whichever
        -- is later, as one lower bound (given a second one, btree may start from the other
        -- and walk the whole index).
        (SELECT r.xid, r.id, r.pid, r.enqueued_at, r.schema_name, r.table_name, r.op, r.old_row, r.new_row,
                r.rows, greatest(r.rows, 1) AS events
         FROM cdc_invalidator.queue_v1 r
         WHERE (r.xid, r.id) > (%(from_xid)s::xid8, %(from_id)s)
           AND r.xid < pg_snapshot_xmax(w.cur)
           AND pg_visible_in_snapshot(r.xid, w.cur)
         ORDER BY r.xid, r.id
         LIMIT %(limit)s)
        ORDER BY xid, id
        LIMIT %(limit)s
    ) q
    ) q WHERE q.before < %(limit)s
),
last AS (SELECT xid, id FROM chunk ORDER BY xid DESC, id DESC LIMIT 1)
-- The header: [snapshot, row count, last xid, last id, now, -, -, ages, -, events], where
-- now is the snapshot this statement runs in (not the window's, past a window's first
-- chunk: what it sees complete judges the changes deleted early, capture/early.py), and
-- ages is a
-- JSON array of [xid, seconds] for each transaction in the chunk: how old it is by the
-- server's clock, from its start (the queue records no commit time), for the lag metric.
SELECT w.cur::text, (SELECT count(*) FROM chunk), (SELECT xid::text::int8 FROM last),
       (SELECT id FROM last), pg_current_snapshot()::text, NULL, NULL,
       (SELECT json_agg(json_build_array(t.xid::text::int8,
                                         extract(epoch FROM now() - t.began)::float8))
        FROM (SELECT xid, min(enqueued_at) AS began FROM chunk GROUP BY xid) t)::text,
       NULL, (SELECT coalesce(sum(events), 0)::int8 FROM chunk)
FROM w
UNION ALL
-- A row: [-, xid, pid, id, schema, table, op, old, new, rows]; an xid8 as a number (its
-- text is its decimal value): cheaper to read than text. (pid: the writer's backend,
-- NULL but for a row a NOTIFY payload was sent for.)
SELECT NULL, c.xid::text::int8, c.pid, c.id, c.schema_name, c.table_name, c.op,
       c.old_row::text, c.new_row::text, c.rows
FROM chunk c
