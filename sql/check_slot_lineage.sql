-- `check`, logical mode: this server's lineage (server_lineage_v1() in schema.sql), which
-- the listener compares with slot_state_v1.server_lineage at its next start.
SELECT cdc_invalidator.server_lineage_v1()
