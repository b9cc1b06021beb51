-- The listener is quiet again (it LISTENed first): capture functions send the wake-up
-- from now on. Those that found it busy and sent none are waited for by writers_seen.sql.
SELECT pg_advisory_unlock(hashtext('cdc_invalidator.queue_v1'), 1)
