-- cdc-invalidator: remove every object the install created, in one transaction:
-- our triggers and trigger functions on watched tables (leave_trigger.sql, before this),
-- the rebuild guard's event triggers (only a superuser made them, and may drop them;
-- else they go with their functions), then the schema with the queue, dead letters and
-- listener state. Events still queued are dropped with the queue: let the listener drain
-- it first (`cdc-invalidator status` shows the backlog). Running it when nothing is
-- installed does nothing.
DO $uninstall$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_rebuilt;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_dropped;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_parts_moved;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_parts_dropped;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_rewritten;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_enum_labels;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_enum_renamed;
    END IF;
END
$uninstall$;
DROP SCHEMA IF EXISTS cdc_invalidator CASCADE;
