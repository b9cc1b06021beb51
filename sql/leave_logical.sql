-- Logical capture's objects, if this database had them: the publication goes, and tables
-- whose REPLICA IDENTITY install set to FULL get their old identity back. (The slot is
-- dropped apart, after it or from another session: it cannot be in one that has written.)
DO $leave$
BEGIN
    -- The DDL guard only serves logical capture (and only a superuser made it, and may
    -- drop it; left behind, it does nothing without the publication, and goes with the
    -- schema on uninstall). First: it refuses a DROP PUBLICATION of ours.
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_guard;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_guard_drops;
        DROP EVENT TRIGGER IF EXISTS cdc_invalidator_guard_index;
    END IF;
END
$leave$;
DROP PUBLICATION IF EXISTS {publication};
DO $leave_identity$
BEGIN
    IF to_regprocedure('cdc_invalidator.restore_replica_identity(regclass[])') IS NOT NULL THEN
        PERFORM cdc_invalidator.restore_replica_identity('{{}}');
    END IF;
END
$leave_identity$;
