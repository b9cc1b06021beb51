-- Trigger mode: one sweep of every watched table's templates, queued for the listener
-- (queue_sweep_once_v1, schema.sql), after `install` dropped a replication slot of ours
-- (logical capture's, or one of an earlier slot_name) that may have held changes not
-- handed out yet. The capture triggers are in place by then: what was written after
-- install's commit is queued by them, what came before is swept.
SELECT cdc_invalidator.queue_sweep_once_v1(w.schema_name, w.table_name, %(reason)s)
FROM cdc_invalidator.watched_v1 w
