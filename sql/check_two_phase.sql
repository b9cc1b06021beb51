-- Trigger mode: whether this server lets transactions be prepared (two-phase commit),
-- which PostgreSQL refuses for one that sent a NOTIFY: a capture function's wake-up
-- (sent while the listener is quiet, so a PREPARE may pass under load, fail when idle);
-- and the capture functions compiled before they read cdc_invalidator.notify (a release
-- before it: they send the wake-up whatever the session says, until install again).
SELECT current_setting('max_prepared_transactions')::int,
       (SELECT count(*) FROM pg_proc p
        WHERE p.pronamespace = 'cdc_invalidator'::regnamespace
          AND p.proname LIKE 'capture\_%\_v1'
          AND strpos(p.prosrc, 'cdc_invalidator.notify') = 0)
