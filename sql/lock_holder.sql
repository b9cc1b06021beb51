-- Who holds the consumer lock (take_lock.sql's) that this session could not take: its
-- backend, role and application_name (which pg_stat_activity shows every role), and
-- whether it is a listener like this one (this session's role and application_name:
-- the configuration's; a psql session of the listener's role is not); or the prepared
-- transaction that holds it (a
-- transaction-level lock of any role's, prepared: it outlives its session, and a server
-- restart, until COMMIT or ROLLBACK PREPARED), found by its transaction id's lock. A
-- listener of ours connects as the listener's role; any other role can take the same
-- advisory lock (it needs no privilege) and keep every listener on standby for as long
-- as it holds it. (A bigint key shows in pg_locks as classid, its high 32 bits, and objid,
-- its low ones, objsubid 1.)
SELECT a.pid, coalesce(a.usename::text, p.owner::text) AS role, a.application_name,
       coalesce(a.usename = current_user
                AND a.application_name = current_setting('application_name'), false) AS ours,
       p.gid
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN pg_locks x ON l.pid IS NULL AND x.locktype = 'transactionid'
                    AND x.virtualtransaction = l.virtualtransaction
LEFT JOIN pg_prepared_xacts p ON p.transaction = x.transactionid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
  AND l.classid::bigint = (hashtext('cdc_invalidator.queue_v1')::bigint >> 32) & 4294967295
  AND l.objid::bigint = hashtext('cdc_invalidator.queue_v1')::bigint & 4294967295
LIMIT 1
