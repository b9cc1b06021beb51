-- Whether the listener's saved position lies past this server's transaction counter. On
-- the cluster that saved it that cannot be: the database was restored from a dump into
-- another cluster (or copied there), whose transaction ids run lower. Its new changes
-- would look done already, and be skipped. And this run of the server: when it started,
-- and when it last recovered from a crash. A reconnect that finds another run (a standby
-- promoted after a failover, a restart, a crash of any backend) resumes from the
-- position saved, not from the one the last connection reached: a crash loses the WAL
-- not yet flushed, and with it the transaction ids handed out since (asynchronous
-- commits, rollbacks), which recovery hands out again. The postmaster survives such a
-- crash, its start time with it; recovery from one resets the shared statistics, whose
-- stats_reset then says when. (pg_stat_reset_shared() resets it too: a needless, harmless
-- resume from the position saved.)
SELECT pg_snapshot_xmax(%(snapshot)s::pg_snapshot) > pg_snapshot_xmax(pg_current_snapshot()),
       pg_snapshot_xmax(pg_current_snapshot())::text,
       -- (epochs, not the session's time zone)
       extract(epoch FROM pg_postmaster_start_time())::text || ' '
           || coalesce((SELECT extract(epoch FROM stats_reset)::text FROM pg_stat_bgwriter), '-')
