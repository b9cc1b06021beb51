-- Whether a later install replaced this listener's mapping (sql/schema.sql says why).
SELECT cdc_invalidator.mapping_superseded_v1(%(mapping)s)
