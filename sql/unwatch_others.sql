-- Tables that were watched but are no longer in the configuration lose their triggers,
-- and so does every other table carrying a trigger of ours that is neither a configured
-- table nor one of its partitions: the rebuild guard's stand-in on a table renamed away
-- from a watched name since, for one (it would sweep that name's keys on every write).
SELECT cdc_invalidator.unwatch(t.relid)
FROM (
    SELECT w.relid FROM cdc_invalidator.watched_v1 w
    UNION
    SELECT tg.tgrelid::regclass FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
    WHERE p.pronamespace = 'cdc_invalidator'::regnamespace AND tg.tgparentid = 0
      AND NOT EXISTS (SELECT FROM pg_partition_ancestors(tg.tgrelid) a
                      WHERE a.relid::oid = ANY (ARRAY[{tables}]::regclass[]::oid[]))
) t
WHERE t.relid::oid <> ALL (ARRAY[{tables}]::regclass[]::oid[]);
