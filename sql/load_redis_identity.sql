-- The Redis server the listener last wrote to, and seconds since it was saved.
SELECT identity, extract(epoch FROM now() - seen_at)::float8 AS age_s
FROM cdc_invalidator.redis_identity_v1
