-- Logical mode: one sweep of every published table's templates, written into the WAL for
-- the listener (emit_sweep_v1, rebuild_guard.sql), after `install` dropped a replication
-- slot of ours that may have held changes not handed out yet (a slot of an earlier
-- slot_name). Run once the configured slot exists, so that it decodes the sweeps.
SELECT cdc_invalidator.emit_sweep_v1(p.schema_name, p.table_name, %(reason)s)
FROM cdc_invalidator.published_v1 p
