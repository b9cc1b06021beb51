-- The Redis identity last seen, and seconds since it was saved (no row before the first).
SELECT identity, extract(epoch FROM now() - seen_at)::float8
FROM cdc_invalidator.redis_identity_v1
