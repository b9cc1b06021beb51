-- Triggers are not needed in this mode: writers stop paying for them (leave_trigger.sql
-- took them off); what is left of tables dropped since they were watched goes too.
SELECT cdc_invalidator.unwatch(relid) FROM cdc_invalidator.watched_v1;
-- A publication changed outside install since (publication_drift_v1(): its publish
-- options, a row filter, a table or a key column taken out): what it did not publish
-- meanwhile was not captured. Every table it was made for is swept, in this transaction,
-- as it is put right below. (emit_sweep_v1: sql/rebuild_guard.sql, there since the
-- install before.)
DO $drift$
DECLARE
    drift text := cdc_invalidator.publication_drift_v1();
BEGIN
    IF drift IS NOT NULL
       AND to_regprocedure('cdc_invalidator.emit_sweep_v1(text, text, text)') IS NOT NULL THEN
        PERFORM cdc_invalidator.emit_sweep_v1(p.schema_name, p.table_name, drift)
        FROM cdc_invalidator.published_v1 p;
        RAISE WARNING 'cdc_invalidator: %: put right, and every table it held is swept', drift;
    END IF;
END
$drift$;
-- What the configuration names, by relation and column number (tables no longer
-- configured are forgotten first, so that the DDL guard leaves them alone).
DELETE FROM cdc_invalidator.published_v1;
{records}
-- Identities set FULL for tables no longer configured go back to what they were.
SELECT cdc_invalidator.restore_replica_identity(ARRAY[{tables}]::regclass[]);
SELECT cdc_invalidator.publish({publication}, ARRAY[{tables}]::regclass[]);
INSERT INTO cdc_invalidator.slot_state_v1 (slot_name) VALUES ({slot})
ON CONFLICT (slot_name) DO NOTHING;
