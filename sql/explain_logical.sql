-- `cdc-invalidator explain`, logical mode: every batch kept in the history, oldest
-- first: when it was recorded (right after Redis confirmed its deletes) and its events
-- (each transaction's xid, commit LSN and commit time on its first event).
SELECT id, at, events::text
FROM cdc_invalidator.history_v1
ORDER BY id
