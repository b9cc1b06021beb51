-- Delete a chunk of queue rows that lie below the finished snapshot's xmin: their
-- transactions were all visible in it, so their keys are gone. In the same statement,
-- the saved snapshots (progress_v1) older than replay_history (%(keep_s)s seconds), all
-- but the newest of them: that one is where a replay window starting at the cutoff
-- begins (history_trigger.sql). A few rows each time, found by the index on `at`.
WITH old_progress AS (
    DELETE FROM cdc_invalidator.progress_v1
    WHERE at < (SELECT max(at) FROM cdc_invalidator.progress_v1
                WHERE at <= now() - make_interval(secs => %(keep_s)s))
)
DELETE FROM cdc_invalidator.queue_v1
WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM cdc_invalidator.queue_v1
    WHERE xid < pg_snapshot_xmin(%(snapshot)s::pg_snapshot)
    LIMIT %(limit)s))
