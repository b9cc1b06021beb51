-- Trigger capture's objects on the application's tables go: every table with a trigger
-- whose function lives in our schema, registered or not (the capture triggers, and the
-- rebuild guard's stand-ins, which watched_v1 does not list). If an application's
-- table had any, this transaction says so (cdc_invalidator.left_trigger), for
-- logical_install.sql. (Our own identity_due_v1 has a trigger of ours too.)
DO $leave_trigger$
BEGIN
    IF to_regnamespace('cdc_invalidator') IS NOT NULL THEN
        IF EXISTS (SELECT FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
                   JOIN pg_class c ON c.oid = tg.tgrelid
                   WHERE p.pronamespace = 'cdc_invalidator'::regnamespace
                     AND c.relnamespace <> 'cdc_invalidator'::regnamespace) THEN
            PERFORM set_config('cdc_invalidator.left_trigger', 'on', true);
        END IF;
        PERFORM cdc_invalidator.unwatch(t.tgrelid::regclass)
        FROM (SELECT DISTINCT tg.tgrelid
              FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
              WHERE p.pronamespace = 'cdc_invalidator'::regnamespace) t;
    END IF;
END
$leave_trigger$;
