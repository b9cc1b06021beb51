-- Whether the listener's saved position lies past this server's transaction counter. On
-- the cluster that saved it that cannot be: the database was restored from a dump into
-- another cluster (or copied there), whose transaction ids run lower. Its new changes
-- would look done already, and be skipped. And when this server started: a reconnect
-- that finds another start (a standby promoted after a failover, a restart) resumes
-- from the position saved, not from the one the last connection reached.
SELECT pg_snapshot_xmax(%(snapshot)s::pg_snapshot) > pg_snapshot_xmax(pg_current_snapshot()),
       pg_snapshot_xmax(pg_current_snapshot())::text,
       extract(epoch FROM pg_postmaster_start_time())::text  -- (not the session's time zone)
