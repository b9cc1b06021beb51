-- A mapping's state: 'current', 'superseded' by a later install (sql/schema.sql says
-- why a listener on it stops) or 'not installed'.
SELECT cdc_invalidator.mapping_state_v1(%(mapping)s)
