UPDATE cdc_invalidator.slot_state_v1
SET resync_reason = %(reason)s, acked_lsn = coalesce(%(lsn)s::pg_lsn, acked_lsn)
WHERE slot_name = %(slot)s
