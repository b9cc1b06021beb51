-- `check`, trigger mode: this server's lineage (server_lineage_v1() in schema.sql) and the
-- one the listener last ran on: another one is swept for at the listener's next start; and
-- whether the listener's row was recorded in another listener_state_v1 or database (a dump
-- restored, a copy of another database: note_server_v3() sweeps for it too).
SELECT cdc_invalidator.server_lineage_v1(), s.server_lineage,
       coalesce(s.recorded_in <> 'cdc_invalidator.listener_state_v1'::regclass
                OR s.recorded_in_database <> cdc_invalidator.database_oid_v1(), false)
FROM cdc_invalidator.listener_state_v1 s
