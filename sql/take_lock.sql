-- One listener consumes the queue at a time: the session lock goes with the session,
-- so a crashed listener's replacement takes over as soon as PostgreSQL sees it gone.
SELECT pg_try_advisory_lock(hashtext('cdc_invalidator.queue_v1'))
