-- The DDL guard (event trigger, sql/logical.sql) stands aside while install does its
-- work itself: for this transaction only.
SELECT set_config('cdc_invalidator.installing', 'on', true);
