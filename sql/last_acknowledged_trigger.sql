-- Seconds since the listener last acknowledged events (trigger mode), or NULL.
SELECT extract(epoch FROM now() - last_processed_at)::float8 FROM cdc_invalidator.listener_state_v1
