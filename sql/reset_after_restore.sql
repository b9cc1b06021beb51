-- cdc-invalidator, trigger mode: after the database was restored from a dump into another
-- cluster (pg_dump / pg_restore, or copied by logical replication), the listener's saved
-- position and the queue's transaction ids come from the old cluster's counter, which
-- this one does not share. The listener refuses to start until this has run: as the
-- role that installed cdc_invalidator, with the listener stopped, in one transaction
-- (psql -X -v ON_ERROR_STOP=1 --single-transaction -f reset_after_restore.sql).

-- Queue rows stamped with ids this cluster has not reached are stamped again with this
-- transaction's id: they are processed once more (their keys deleted again, harmless),
-- then pruned as usual.
UPDATE cdc_invalidator.queue_v1 SET xid = pg_current_xact_id()
WHERE xid >= pg_snapshot_xmax(pg_current_snapshot());
-- Start from the beginning of this cluster's counter: every change committed here since
-- the restore is read (the rest again, harmlessly).
UPDATE cdc_invalidator.listener_state_v1
SET snapshot = '1:1:', window_end = NULL, after_xid = NULL, after_id = NULL;
-- The snapshots saved for replay count in the old cluster's ids too: without them, a
-- replay takes every queue row kept (history_trigger.sql), as after a fresh install.
DELETE FROM cdc_invalidator.progress_v1;
