-- LISTEN on the wake-up's channel and on the NOTIFY payloads' own (sql/schema.sql,
-- payload_channel_v1), whose name the listener does not read (its session could:
-- pg_listening_channels(), docs/DBA.md).
SELECT cdc_invalidator.listen_v1()
