-- Logical capture's objects, if this database had them: the publication goes, and tables
-- whose REPLICA IDENTITY install set to FULL get their old identity back. (The slot is
-- dropped after this transaction: that cannot run inside one that has written.)
DROP PUBLICATION IF EXISTS {publication};
DO $leave$
BEGIN
    IF to_regprocedure('cdc_invalidator.restore_replica_identity(regclass[])') IS NOT NULL THEN
        PERFORM cdc_invalidator.restore_replica_identity('{{}}');
    END IF;
END
$leave$;
