-- After quiet.sql: true once no transaction that found the listener busy (and so sent
-- no wake-up) is still open. Each holds this lock shared until it ends (wake_up_v1() in
-- schema.sql); taken and let go at once, never waited for: a long transaction keeps the
-- listener polling, not stopped.
SELECT CASE WHEN pg_try_advisory_lock(hashtext('cdc_invalidator.queue_v1'), 2)
            THEN pg_advisory_unlock(hashtext('cdc_invalidator.queue_v1'), 2) ELSE false END
