-- The Redis server the listener writes to now.
INSERT INTO cdc_invalidator.redis_identity_v1 (identity) VALUES (%(identity)s)
ON CONFLICT (singleton) DO UPDATE SET identity = EXCLUDED.identity, seen_at = now()
