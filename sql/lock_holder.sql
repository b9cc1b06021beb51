-- Who holds the consumer lock (take_lock.sql's) that this session could not take: its
-- backend, role and application_name (which pg_stat_activity shows every role), and
-- whether its role is this session's. A listener of ours connects as the listener's
-- role; any other role can take the same advisory lock (it needs no privilege) and keep
-- every listener on standby for as long as its session lasts. (A bigint key shows in
-- pg_locks as classid, its high 32 bits, and objid, its low ones, objsubid 1.)
SELECT a.pid, a.usename::text, a.application_name, a.usename = current_user AS ours
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
  AND l.classid::bigint = (hashtext('cdc_invalidator.queue_v1')::bigint >> 32) & 4294967295
  AND l.objid::bigint = hashtext('cdc_invalidator.queue_v1')::bigint & 4294967295
LIMIT 1
