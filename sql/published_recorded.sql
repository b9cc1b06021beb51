-- Whether install recorded the published tables by relation (published_v1); an older
-- install did not, and the configured tables are then resolved by name.
SELECT to_regclass('cdc_invalidator.published_v1') IS NOT NULL AS recorded
