-- This install's mapping (a fingerprint of the configuration's tables), unless it is
-- already the last one installed: a listener still on a mapping installed before it
-- stops (mapping_state_v1() in sql/schema.sql).
INSERT INTO cdc_invalidator.mapping_v1 (fingerprint)
SELECT {fingerprint}
WHERE {fingerprint} IS DISTINCT FROM (
    SELECT m.fingerprint FROM cdc_invalidator.mapping_v1 m ORDER BY m.id DESC LIMIT 1);
