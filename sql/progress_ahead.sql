-- Whether the listener's saved position lies past this server's transaction counter. On
-- the cluster that saved it that cannot be: the database was restored from a dump into
-- another cluster (or copied there), whose transaction ids run lower. Its new changes
-- would look done already, and be skipped.
SELECT pg_snapshot_xmax(%(snapshot)s::pg_snapshot) > pg_snapshot_xmax(pg_current_snapshot()),
       pg_snapshot_xmax(pg_current_snapshot())::text
