-- Replay, logical mode: the batches acknowledged in the window, by id (the position a
-- skipped row is logged with).
SELECT id, events::text
FROM cdc_invalidator.history_v1
WHERE at >= now() - make_interval(secs => %(seconds)s)
ORDER BY id
