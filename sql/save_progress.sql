-- Every transaction visible in %(snapshot)s has had its keys deleted, and so have the
-- rows of the window ending at %(window_end)s up to (%(after_xid)s, %(after_id)s).
-- The same statement records the snapshot with the time of the save, for replay
-- (progress_v1), when it moved: a save within a window (the position only) adds no row.
-- (The CTE reads the state as it was before the UPDATE: every part of one statement
-- sees the same snapshot.)
-- Nothing is saved by a listener whose mapping a later install replaced (it returns 0):
-- it rendered what that install's capture queued with its older templates.
WITH before AS (
    SELECT snapshot::text AS snapshot FROM cdc_invalidator.listener_state_v1
), saved AS (
    UPDATE cdc_invalidator.listener_state_v1
    SET snapshot = %(snapshot)s::pg_snapshot,
        window_end = %(window_end)s::pg_snapshot,
        after_xid = %(after_xid)s::xid8,
        after_id = %(after_id)s,
        last_processed_at = now(),
        events_processed = events_processed + %(events)s
    WHERE cdc_invalidator.mapping_state_v1(%(mapping)s, %(written_at)s)
          NOT IN ('superseded', 'behind')
    RETURNING snapshot
), recorded AS (
    INSERT INTO cdc_invalidator.progress_v1 (snapshot)
    SELECT saved.snapshot FROM saved
    WHERE saved.snapshot::text IS DISTINCT FROM (SELECT snapshot FROM before)
)
SELECT count(*) FROM saved
