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
-- Registered by an earlier install that could not make the slot (its role had no
-- REPLICATION, or the script was applied by hand), and never made since: the publication
-- has held the tables from then on, and what was written meanwhile is in no slot. The
-- slot this install makes owes a sweep, as one the listener makes would (a review: a
-- second install made it and swept nothing). (Before the row is inserted: a first
-- install's own row is no such one.)
UPDATE cdc_invalidator.slot_state_v1 st
SET resync_reason = coalesce(st.resync_reason, format('replication slot %s was registered '
    'by an earlier install and never made: what was written to the watched tables since '
    'was in no slot', st.slot_name))
WHERE st.slot_name = {slot} AND st.acked_lsn IS NULL
  AND NOT EXISTS (SELECT FROM pg_replication_slots s WHERE s.slot_name = st.slot_name);
INSERT INTO cdc_invalidator.slot_state_v1 (slot_name) VALUES ({slot})
ON CONFLICT (slot_name) DO NOTHING;
-- A dump restored, or a copy of another database: a row of slot_state_v1 recorded in
-- another table than this one, or in another database (recorded_in, recorded_in_database,
-- logical.sql), which the restore or the copy brought: the database went back to that
-- time. Owed by the slot this install is for (a restore into another database of the
-- cluster, or a copy, needs a slot_name of its own, and so this install). Every row,
-- the one inserted above too, is then recorded here by record_table.sql, which install
-- runs after this script, as the listener does at connect (slot_info.sql compares).
UPDATE cdc_invalidator.slot_state_v1
SET resync_reason = coalesce(resync_reason, 'the database was restored from a dump or '
    'copied from another (cdc_invalidator.slot_state_v1''s rows were recorded in another '
    'table or database): it went back to the time of the dump or copy')
WHERE slot_name = {slot}
  AND EXISTS (SELECT FROM cdc_invalidator.slot_state_v1 o
              WHERE o.recorded_in <> 'cdc_invalidator.slot_state_v1'::regclass
                 OR o.recorded_in_database <> cdc_invalidator.database_oid_v1());
-- The server's run, as trigger mode's install records it in listener_state_v1: a crash
-- before the listener's first start is seen by it too. Never over a listener's.
UPDATE cdc_invalidator.slot_state_v1
SET server_run = cdc_invalidator.server_run_v1()
WHERE slot_name = {slot} AND server_run IS NULL;
-- And its lineage, likewise (a failover before the listener's first start is seen by it).
UPDATE cdc_invalidator.slot_state_v1
SET server_lineage = cdc_invalidator.server_lineage_v1()
WHERE slot_name = {slot} AND server_lineage IS NULL;
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
