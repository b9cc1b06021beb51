-- Delete a chunk of queue rows that lie below the finished snapshot's xmin: their
-- transactions were all visible in it, so their keys are gone.
DELETE FROM cdc_invalidator.queue_v1
WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM cdc_invalidator.queue_v1
    WHERE xid < pg_snapshot_xmin(%(snapshot)s::pg_snapshot)
    LIMIT %(limit)s))
