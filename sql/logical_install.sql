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
-- A switch from trigger capture (leave_trigger.sql took the triggers off): what the queue
-- still held, and what is written from this commit until the slot is made, is captured
-- by neither mode. The listener sweeps every table first (record_slot.sql keeps the
-- reason when the slot is made).
UPDATE cdc_invalidator.slot_state_v1
SET resync_reason = coalesce(resync_reason, 'capture switched from trigger mode: what the '
    'queue still held, and what was written until the replication slot was made, was '
    'captured by neither')
WHERE slot_name = {slot}
  AND current_setting('cdc_invalidator.left_trigger', true) = 'on';
