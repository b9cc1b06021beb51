-- How long install's or uninstall's transaction waits for any one lock before it gives
-- up (all of it rolled back; `install` and `uninstall` try again): at most {ms} ms, and
-- under half of deadlock_timeout. Writes queue behind the script's lock request no
-- longer than that. And a writer queued behind a lock the script holds, while the
-- script waits for one that writer holds, is in a deadlock, where PostgreSQL aborts the
-- waiter that checks first, deadlock_timeout after it began to wait: the script's wait
-- ends before, unless that writer had been waiting behind it for most of that time.
-- A lock_timeout the session already has (PGOPTIONS='-c lock_timeout=2s') is the
-- operator's choice, kept: under writers whose transactions hold a table longer than
-- that bound, one after another, no try would ever get its lock.
SELECT pg_catalog.set_config('lock_timeout', CASE
    WHEN pg_catalog.current_setting('lock_timeout') NOT IN ('0', '0ms')
        THEN pg_catalog.current_setting('lock_timeout')
    ELSE least(
        {ms},
        (extract(epoch FROM pg_catalog.current_setting('deadlock_timeout')::interval)
         * 1000 / 2)::int)::text || 'ms'
    END, true);
