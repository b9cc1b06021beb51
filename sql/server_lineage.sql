-- Trigger mode: this server's lineage (server_lineage_v1() in schema.sql), the one the
-- listener last ran on (or install, before its first start), and the sweep still owed,
-- if any. A new lineage may lack transactions that readers of the old one saw and
-- cached (asynchronous replication, a restore point): the listener then sweeps every
-- watched table (capture/lineage.py).
SELECT cdc_invalidator.server_lineage_v1(), s.server_lineage, s.resync_reason
FROM cdc_invalidator.listener_state_v1 s
