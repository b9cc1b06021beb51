-- Tables that were watched but are no longer in the configuration lose their triggers,
-- and so does every other table carrying a trigger of ours that is neither a configured
-- table nor one of its partitions or inheritance children: the rebuild guard's stand-in
-- on a table renamed away from a watched name since, for one (it would sweep that name's
-- keys on every write). A child's triggers are left to watch(), which reads their states
-- first: taken off here, one dropped or disabled meanwhile was put back unswept.
SELECT cdc_invalidator.unwatch(t.relid)
FROM (
    SELECT w.relid FROM cdc_invalidator.watched_v1 w
    UNION
    SELECT tg.tgrelid::regclass FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
    WHERE p.pronamespace = 'cdc_invalidator'::regnamespace AND tg.tgparentid = 0
      AND tg.tgrelid::oid <> ALL (ARRAY[{tables}]::regclass[]::oid[])
      AND NOT (cdc_invalidator.ancestors_v1(tg.tgrelid) && ARRAY[{tables}]::regclass[]::oid[])
) t
WHERE t.relid::oid <> ALL (ARRAY[{tables}]::regclass[]::oid[]);
