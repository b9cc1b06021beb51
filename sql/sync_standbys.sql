-- Trigger mode, a quiet listener: whether synchronous standbys are configured, so that
-- commits send no wake-up, whatever their synchronous_commit (schema.sql's
-- wake_needed_v1()), and the quiet listener reads the queue every 10 ms instead.
SELECT current_setting('synchronous_standby_names') <> ''
