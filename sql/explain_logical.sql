-- `cdc-invalidator explain`, logical mode: every batch kept in the history, oldest
-- first: when it was recorded (after Redis confirmed its deletes: batches are gathered
-- into one row, written up to a second or so later) and its events
-- (each transaction's xid, commit LSN and commit time on its first event).
SELECT id, at, events::text
FROM cdc_invalidator.history_v1
ORDER BY id
