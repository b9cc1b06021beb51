-- `check`, trigger mode: this server's lineage (server_lineage_v1() in schema.sql) and the
-- one the listener last ran on: another one is swept for at the listener's next start.
SELECT cdc_invalidator.server_lineage_v1(), s.server_lineage
FROM cdc_invalidator.listener_state_v1 s
