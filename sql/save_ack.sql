-- Saved before the slot is told: the slot's confirmed position never passes this one.
-- Only while the slot is streamed by our walsender: a listener that lost it (stopped,
-- then resumed after another took over) must not write an older position, which the
-- next to take the slot would read as changes missed (a sweep of every table).
UPDATE cdc_invalidator.slot_state_v1
SET acked_lsn = %(lsn)s::pg_lsn,
    events_processed = events_processed + %(events)s,
    last_processed_at = CASE WHEN %(events)s > 0 THEN now() ELSE last_processed_at END
WHERE slot_name = %(slot)s
  AND (SELECT s.active_pid FROM pg_replication_slots s WHERE s.slot_name = %(slot)s)
      = %(walsender)s
  -- Nor by a listener whose mapping a later install replaced: it rendered what was
  -- published since with its older templates (no row: the caller asks which it was).
  AND cdc_invalidator.mapping_state_v1(%(mapping)s, %(written_at)s)
      NOT IN ('superseded', 'behind')
RETURNING true
