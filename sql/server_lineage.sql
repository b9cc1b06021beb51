-- Logical mode, at each connect: this server's lineage (server_lineage_v1() in
-- schema.sql), compared with the one the listener's previous session saw, and its run
-- (server_run_v1()), compared with the one slot_state_v1 recorded.
SELECT cdc_invalidator.server_lineage_v1(), cdc_invalidator.server_run_v1()
