-- Before install: which of an earlier install's records are there (trigger mode's
-- watched_v1, logical mode's published_v1, and mapping_v1: removed_unrecorded.sql).
SELECT to_regclass('cdc_invalidator.watched_v1') IS NOT NULL,
       to_regclass('cdc_invalidator.published_v1') IS NOT NULL,
       to_regclass('cdc_invalidator.mapping_v1') IS NOT NULL
