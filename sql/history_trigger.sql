-- Replay, trigger mode: the queue rows whose keys were deleted in the last %(seconds)s
-- seconds (processed rows are kept for replay_history; rows not processed yet are
-- harmless to include). Not those written in the window (enqueued_at, the writer's
-- now()): a row written long before its keys were deleted (a backlog drained, a long
-- transaction, a bulk statement whose keys took seconds) would be missed. The listener
-- saves, with each snapshot it finished, when it did (progress_v1): every transaction
-- visible in the newest snapshot saved at or before the window's start had its keys
-- deleted before it, so the rows of the window are those it does not see (which takes
-- in every row written in the window too). No such snapshot (none saved yet, or none
-- that old is kept: pruning keeps one past replay_history): every row kept. The index on (xid, id) finds
-- them from the snapshot's xmin: everything below it is visible in it.
-- The json columns as text: the listener's own decoding reads them (a value the driver
-- cannot parse would fail the whole read). `rows`: a pack's size (NULL: one change).
WITH start AS MATERIALIZED (
    SELECT (SELECT snapshot FROM cdc_invalidator.progress_v1
            WHERE at <= now() - make_interval(secs => %(seconds)s)
            ORDER BY at DESC LIMIT 1) AS snapshot
)
SELECT id, schema_name, table_name, op, old_row::text, new_row::text, rows
FROM cdc_invalidator.queue_v1
WHERE xid >= (SELECT coalesce(pg_snapshot_xmin(snapshot), '0'::xid8) FROM start)
  AND NOT coalesce(pg_visible_in_snapshot(xid, (SELECT snapshot FROM start)), false)
ORDER BY id
