-- `cdc-invalidator explain`, logical mode: how far back history_v1 reaches and how many
-- rows it holds (each gathers batches).
SELECT (SELECT min(at) FROM cdc_invalidator.history_v1),
       (SELECT count(*) FROM cdc_invalidator.history_v1),
       (SELECT max(last_processed_at) FROM cdc_invalidator.slot_state_v1),
       false,
       now()
