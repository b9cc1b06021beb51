-- Our event triggers (logical mode's DDL guard, sql/logical.sql; trigger mode's rebuild
-- guard, sql/rebuild_guard.sql) stand aside while install does its work itself: for this
-- transaction only.
SELECT set_config('cdc_invalidator.installing', 'on', true);
