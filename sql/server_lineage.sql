-- Logical mode, at each connect: this server's lineage (server_lineage_v1() in
-- schema.sql), compared with the one the listener's previous session saw.
SELECT cdc_invalidator.server_lineage_v1()
