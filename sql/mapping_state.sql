-- A mapping's state: 'current', 'superseded' by a later install, 'behind' it, or 'not
-- installed' (sql/schema.sql says which a listener stops at).
SELECT cdc_invalidator.mapping_state_v1(%(mapping)s, %(written_at)s)
