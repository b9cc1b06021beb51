-- This install's mapping (a fingerprint of the configuration's tables, and what they
-- render), unless it is already the last one installed: a listener still on a mapping
-- installed before it stops (mapping_state_v1() in sql/schema.sql), and a change of a
-- table this mapping no longer names is rendered with the last one that did
-- (retired_table_v1()). The last row, recorded before mapping_v1.tables, is filled in.
UPDATE cdc_invalidator.mapping_v1 m SET tables = {tables}::jsonb
WHERE m.id = (SELECT l.id FROM cdc_invalidator.mapping_v1 l ORDER BY l.id DESC LIMIT 1)
  AND m.fingerprint = {fingerprint} AND m.tables IS NULL;
INSERT INTO cdc_invalidator.mapping_v1 (fingerprint, tables)
SELECT {fingerprint}, {tables}::jsonb
WHERE {fingerprint} IS DISTINCT FROM (
    SELECT m.fingerprint FROM cdc_invalidator.mapping_v1 m ORDER BY m.id DESC LIMIT 1);
