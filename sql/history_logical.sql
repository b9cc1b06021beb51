-- Replay, logical mode: the batches acknowledged in the window.
SELECT events::text
FROM cdc_invalidator.history_v1
WHERE at >= now() - make_interval(secs => %(seconds)s)
ORDER BY id
