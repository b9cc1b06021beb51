-- Trigger mode: whether this server lets transactions be prepared (two-phase commit),
-- which PostgreSQL refuses for one that sent a NOTIFY: every capture function's wake-up.
SELECT current_setting('max_prepared_transactions')::int
