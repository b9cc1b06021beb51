-- Tables that were watched but are no longer in the configuration lose their triggers.
SELECT cdc_invalidator.unwatch(relid)
FROM cdc_invalidator.watched_v1
WHERE relid::oid <> ALL (ARRAY[{tables}]::regclass[]::oid[]);
