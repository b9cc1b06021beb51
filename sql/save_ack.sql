-- Saved before the slot is told: the slot's confirmed position never passes this one.
UPDATE cdc_invalidator.slot_state_v1
SET acked_lsn = %(lsn)s::pg_lsn,
    events_processed = events_processed + %(events)s,
    last_processed_at = CASE WHEN %(events)s > 0 THEN now() ELSE last_processed_at END
WHERE slot_name = %(slot)s
