-- Trigger mode: the wake-up's locks (schema.sql's wake_needed_v1()) held where no
-- listener of ours holds them: the busy lock, (hashtext('cdc_invalidator.queue_v1'), 1),
-- or the second one, exclusive, by a session that does not hold the consumer lock
-- (take_lock.sql's; advisory locks need no privilege: any role that can connect may take
-- them), or the second one by a prepared transaction. Held so, the first makes capture
-- functions send no wake-up (changes read within poll_interval_ms instead of at once),
-- the second makes them send it at every commit again (serialized), and a prepared one
-- keeps the listener looking for it five times a second until COMMIT or ROLLBACK
-- PREPARED. Each holder's backend, role and application_name, or prepared transaction,
-- and which lock. (A two-key lock shows in pg_locks as classid, the first key, objid,
-- the second, objsubid 2.)
WITH ours AS (
    SELECT l.pid FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
      AND l.classid::bigint = (hashtext('cdc_invalidator.queue_v1')::bigint >> 32) & 4294967295
      AND l.objid::bigint = hashtext('cdc_invalidator.queue_v1')::bigint & 4294967295
)
SELECT l.pid, coalesce(a.usename::text, p.owner::text) AS role, a.application_name, p.gid,
       l.objid::int AS lock, l.mode
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN pg_locks x ON l.pid IS NULL AND x.locktype = 'transactionid'
                    AND x.virtualtransaction = l.virtualtransaction
LEFT JOIN pg_prepared_xacts p ON p.transaction = x.transactionid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
  AND l.classid::bigint = hashtext('cdc_invalidator.queue_v1')::bigint & 4294967295
  AND l.objid IN (1, 2)
  AND ((l.mode = 'ExclusiveLock' AND NOT EXISTS (SELECT FROM ours o WHERE o.pid = l.pid))
       OR (l.objid = 2 AND p.gid IS NOT NULL))
ORDER BY l.pid
