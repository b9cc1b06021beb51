-- `cdc-invalidator explain`, trigger mode: how far back the queue's rows reach (the
-- history), how many there are, when the listener last saved its progress, and whether
-- commit times are recorded.
SELECT (SELECT min(enqueued_at) FROM cdc_invalidator.queue_v1),
       (SELECT count(*) FROM cdc_invalidator.queue_v1),
       (SELECT last_processed_at FROM cdc_invalidator.listener_state_v1),
       current_setting('track_commit_timestamp')::bool,
       now()
