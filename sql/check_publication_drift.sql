-- How the publication differs from what install made it, losing changes (NULL: it does
-- not): publication_drift_v1() in sql/logical.sql.
SELECT cdc_invalidator.publication_drift_v1()
