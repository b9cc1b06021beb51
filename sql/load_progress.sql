SELECT snapshot::text, window_end::text, after_xid::text, after_id
FROM cdc_invalidator.listener_state_v1
