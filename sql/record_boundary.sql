-- Install's step after its commit: where this mapping's capture begins (sql/schema.sql,
-- mapping_boundary_v1), in trigger mode the queue's next id, in logical mode the WAL
-- insert position. Drawn after the commit that replaced the capture functions (or the
-- publication): every row an earlier mapping's function queued has a smaller id, every
-- transaction committed before it a smaller commit position. Recorded once per mapping
-- and mode (an install that changed nothing keeps it).
INSERT INTO cdc_invalidator.mapping_boundary_v1 AS b (mapping, boundary, lsn)
SELECT l.id,
       CASE WHEN %(capture)s = 'trigger'
            THEN nextval(pg_get_serial_sequence('cdc_invalidator.queue_v1', 'id')) END,
       CASE WHEN %(capture)s = 'logical' THEN pg_current_wal_insert_lsn() END
FROM (SELECT m.id, m.fingerprint FROM cdc_invalidator.mapping_v1 m
      ORDER BY m.id DESC LIMIT 1) l
WHERE l.fingerprint = %(fingerprint)s
ON CONFLICT (mapping) DO UPDATE
SET boundary = coalesce(b.boundary, excluded.boundary), lsn = coalesce(b.lsn, excluded.lsn)
