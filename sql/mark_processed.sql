UPDATE cdc_invalidator.listener_state_v1
SET last_processed_at = now(), events_processed = events_processed + %(events)s
