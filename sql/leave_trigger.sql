-- Trigger capture's objects on the application's tables go: every table with a trigger
-- whose function lives in our schema, registered or not (the capture triggers, and the
-- rebuild guard's stand-ins, which watched_v1 does not list).
DO $leave_trigger$
BEGIN
    IF to_regnamespace('cdc_invalidator') IS NOT NULL THEN
        PERFORM cdc_invalidator.unwatch(t.tgrelid::regclass)
        FROM (SELECT DISTINCT tg.tgrelid
              FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
              WHERE p.pronamespace = 'cdc_invalidator'::regnamespace) t;
    END IF;
END
$leave_trigger$;
