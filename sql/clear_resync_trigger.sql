-- Trigger mode: the sweep owed after a change of server (record_lineage.sql) is done:
-- no longer owed, unless another reason was recorded since.
UPDATE cdc_invalidator.listener_state_v1
SET resync_reason = NULL
WHERE resync_reason IS NOT DISTINCT FROM %(reason)s
