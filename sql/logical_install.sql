-- Triggers are not needed in this mode: writers stop paying for them (leave_trigger.sql
-- took them off); what is left of tables dropped since they were watched goes too.
SELECT cdc_invalidator.unwatch(relid) FROM cdc_invalidator.watched_v1;
-- What the configuration names, by relation and column number (tables no longer
-- configured are forgotten first, so that the DDL guard leaves them alone).
DELETE FROM cdc_invalidator.published_v1;
{records}
-- Identities set FULL for tables no longer configured go back to what they were.
SELECT cdc_invalidator.restore_replica_identity(ARRAY[{tables}]::regclass[]);
SELECT cdc_invalidator.publish({publication}, ARRAY[{tables}]::regclass[]);
INSERT INTO cdc_invalidator.slot_state_v1 (slot_name) VALUES ({slot})
ON CONFLICT (slot_name) DO NOTHING;
