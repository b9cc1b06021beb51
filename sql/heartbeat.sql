-- A WAL record in this database (non-transactional, empty): the stream moves, and the
-- slot with it, even when nothing here is written while other databases are.
SELECT pg_logical_emit_message(false, 'cdc_invalidator_heartbeat', '')
