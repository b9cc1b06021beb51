-- cdc-invalidator: remove every object the install created, in one transaction:
-- our triggers and trigger functions on watched tables, then the schema with the queue,
-- dead letters and listener state. Events still queued are dropped with the queue: let
-- the listener drain it first (`cdc-invalidator status` shows the backlog).
-- Running it when nothing is installed does nothing.
DO $uninstall$
BEGIN
    IF to_regnamespace('cdc_invalidator') IS NOT NULL THEN
        -- Every table with a trigger whose function lives in our schema, registered or not.
        PERFORM cdc_invalidator.unwatch(t.tgrelid::regclass)
        FROM (SELECT DISTINCT tg.tgrelid
              FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
              WHERE p.pronamespace = 'cdc_invalidator'::regnamespace) t;
    END IF;
END
$uninstall$;
DROP SCHEMA IF EXISTS cdc_invalidator CASCADE;
