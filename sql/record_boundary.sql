-- Trigger mode, install's step after its commit: where this mapping's capture begins,
-- the queue's next id (sql/schema.sql, mapping_v1.boundary). Drawn after the commit that
-- replaced the capture functions, so every row an earlier mapping's function queued has
-- a smaller id; recorded once per mapping (an install that changed nothing keeps it).
UPDATE cdc_invalidator.mapping_v1 m
SET boundary = nextval(pg_get_serial_sequence('cdc_invalidator.queue_v1', 'id'))
WHERE m.id = (SELECT l.id FROM cdc_invalidator.mapping_v1 l ORDER BY l.id DESC LIMIT 1)
  AND m.fingerprint = %(fingerprint)s AND m.boundary IS NULL
