-- Trigger mode: the server's lineage seen (server_lineage.sql), with the sweep it owes
-- (a reason, or NULL), in one statement: a listener stopped before that sweep is done
-- sweeps again at its next start.
UPDATE cdc_invalidator.listener_state_v1
SET server_lineage = %(lineage)s, resync_reason = %(reason)s
