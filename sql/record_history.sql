INSERT INTO cdc_invalidator.history_v1 (events) VALUES (%(events)s::json)
