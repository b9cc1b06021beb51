-- The next events to invalidate, in (xid, id) order: rows of transactions visible in
-- the window's end snapshot (given, or NULL to take one now) but not in the snapshot the
-- listener finished last (given as its in-flight ids and its xmax). A large window is
-- taken in chunks, each after the last (xid, id) done. The end snapshot comes back on
-- every row, and alone when the window is empty.
-- Rows are returned as JSON text: the listener parses them itself, so that one
-- malformed row becomes a dead letter instead of failing the batch in the driver.
WITH w AS (SELECT coalesce(%(cur)s::pg_snapshot, pg_current_snapshot()) AS cur)
SELECT w.cur::text, q.xid::text, q.id, q.schema_name, q.table_name, q.op,
       q.old_row::text, q.new_row::text,
       -- How old the writing transaction is (by the server's clock): for the lag metric.
       extract(epoch FROM now() - q.enqueued_at)::float8
FROM w LEFT JOIN LATERAL (
    -- Transactions that were still running when the last snapshot was taken.
    -- (The position is a filter here, not an index bound: these rows are few.)
    (SELECT * FROM cdc_invalidator.queue_v1 r
     WHERE r.xid = ANY (%(prev_xip)s::xid8[])
       AND pg_visible_in_snapshot(r.xid, w.cur)
       AND (r.xid > %(after_xid)s::xid8
            OR (r.xid = %(after_xid)s::xid8 AND r.id > %(after_id)s))
     ORDER BY r.xid, r.id
     LIMIT %(limit)s)
    UNION ALL
    -- Transactions that started after it: from (its xmax, 0) or the position, whichever
    -- is later, as one lower bound (given a second one, btree may start from the other
    -- and walk the whole index).
    (SELECT * FROM cdc_invalidator.queue_v1 r
     WHERE (r.xid, r.id) > (%(from_xid)s::xid8, %(from_id)s)
       AND r.xid < pg_snapshot_xmax(w.cur)
       AND pg_visible_in_snapshot(r.xid, w.cur)
     ORDER BY r.xid, r.id
     LIMIT %(limit)s)
    ORDER BY xid, id
    LIMIT %(limit)s
) q ON true
