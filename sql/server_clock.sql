-- The server's clock, in Unix time: commit times in the stream are the server's. And
-- what is complete now (pg_current_snapshot: xmin:xmax:xip), so that a transaction the
-- stream later hands out is known to have been visible to readers by then; and
-- synchronous_standby_names, which says whether a commit may be streamed well before it
-- is visible (it waits for a synchronous standby first: capture/visibility.py).
SELECT extract(epoch FROM clock_timestamp())::float8 AS now,
       pg_current_snapshot()::text AS snapshot,
       current_setting('synchronous_standby_names') AS synchronous_standby_names
