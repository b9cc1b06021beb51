-- Seconds since the listener last acknowledged a batch (logical mode), or NULL.
SELECT extract(epoch FROM now() - max(at))::float8 FROM cdc_invalidator.history_v1
