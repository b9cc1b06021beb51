-- The end of install: its mark goes (schema.sql, install_marks_v1), in its transaction.
DELETE FROM cdc_invalidator.install_marks_v1 WHERE xid = pg_current_xact_id();
