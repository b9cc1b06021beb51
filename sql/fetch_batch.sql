-- Take a batch of events, oldest first. The rows are deleted inside the listener's open
-- transaction, which commits only after Redis confirmed the deletes: a crash or a Redis
-- error rolls back and the events come back. SKIP LOCKED lets a second listener take
-- other rows instead of waiting. No "last id seen" bookmark: ids commit out of order,
-- and a bookmark would skip an event whose transaction committed late.
-- The progress row for `status` is updated by the same statement (one round trip), and
-- like the delete it only counts once the transaction commits.
WITH taken AS (
    DELETE FROM cdc_invalidator.queue_v1
    WHERE id = ANY (ARRAY(
        SELECT id FROM cdc_invalidator.queue_v1
        ORDER BY id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED))
    RETURNING id, enqueued_at, schema_name, table_name, op, old_row, new_row
), progress AS (
    UPDATE cdc_invalidator.listener_state_v1
    SET last_processed_at = now(),
        events_processed = events_processed + (SELECT count(*) FROM taken)
    WHERE EXISTS (SELECT FROM taken)
)
-- The rows as jsonb text: the listener parses them itself, so that one malformed
-- row becomes a dead letter instead of failing the whole batch in the driver.
SELECT id, enqueued_at, schema_name, table_name, op, old_row::text, new_row::text FROM taken
