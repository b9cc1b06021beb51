-- The sweep owed after missed changes is done: no longer owed. Unless the slot was taken
-- by another listener since (which may have recorded a sweep of its own: a loss while
-- it streamed), or the reason is another now.
UPDATE cdc_invalidator.slot_state_v1
SET resync_reason = NULL
WHERE slot_name = %(slot)s AND resync_reason IS NOT DISTINCT FROM %(reason)s
  AND (SELECT s.active_pid FROM pg_replication_slots s WHERE s.slot_name = %(slot)s)
      = %(walsender)s
