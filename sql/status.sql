SELECT
    (SELECT count(*) FROM cdc_invalidator.queue_v1) AS backlog,
    (SELECT extract(epoch FROM now() - min(enqueued_at))::float8
       FROM cdc_invalidator.queue_v1) AS oldest_pending_age_s,
    (SELECT count(*) FROM cdc_invalidator.dead_letter_v1) AS dead_letters,
    s.last_processed_at,
    s.events_processed,
    -- NOTIFY's queue is shared by the whole server; once full, commits that NOTIFY fail.
    pg_notification_queue_usage() AS notify_queue_usage
FROM cdc_invalidator.listener_state_v1 s
