-- Every transaction visible in %(snapshot)s has had its keys deleted, and so have the
-- rows of the window ending at %(window_end)s up to (%(after_xid)s, %(after_id)s).
UPDATE cdc_invalidator.listener_state_v1
SET snapshot = %(snapshot)s::pg_snapshot,
    window_end = %(window_end)s::pg_snapshot,
    after_xid = %(after_xid)s::xid8,
    after_id = %(after_id)s,
    last_processed_at = now(),
    events_processed = events_processed + %(events)s
