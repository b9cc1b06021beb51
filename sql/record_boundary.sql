-- Trigger mode, install's step after its commit: where this mapping's capture begins,
-- the queue's next id (sql/schema.sql, mapping_boundary_v1). Drawn after the commit that
-- replaced the capture functions, so every row an earlier mapping's function queued has
-- a smaller id; recorded once per mapping (an install that changed nothing keeps it).
INSERT INTO cdc_invalidator.mapping_boundary_v1 (mapping, boundary)
SELECT l.id, nextval(pg_get_serial_sequence('cdc_invalidator.queue_v1', 'id'))
FROM (SELECT m.id, m.fingerprint FROM cdc_invalidator.mapping_v1 m
      ORDER BY m.id DESC LIMIT 1) l
WHERE l.fingerprint = %(fingerprint)s
  AND NOT EXISTS (SELECT FROM cdc_invalidator.mapping_boundary_v1 b WHERE b.mapping = l.id)
ON CONFLICT (mapping) DO NOTHING
