-- Our event triggers (logical mode's DDL guard, sql/logical.sql; the rebuild guard,
-- sql/rebuild_guard.sql) stand aside while install does its work itself: for this
-- transaction only, and only with install's mark too (install_marks_v1, schema.sql).
SELECT set_config('cdc_invalidator.installing', 'on', true);
