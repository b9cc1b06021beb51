-- A publication changed outside install since (publication_drift_v1(): its publish
-- options, a row filter, a table or a key column taken out), or dropped: what it did
-- not publish meanwhile was not captured. Every table it was made for is swept, in this transaction,
-- as it is put right after. Asked before this install changes any replica identity,
-- which the publication's column lists would not cover until publish() rewrites them.
-- (emit_sweep_v1: sql/rebuild_guard.sql, there since the install before.)
DO $drift$
DECLARE
    -- Or dropped since (where no guard refused it): what was written until this install
    -- makes it again was never published. (Before PostgreSQL 18 the slot cannot decode
    -- past that gap, nor this sweep: the listener makes the slot again and sweeps.)
    drift text := coalesce(cdc_invalidator.publication_drift_v1(), (
        SELECT format('publication %I was dropped', p.publication)
        FROM cdc_invalidator.published_v1 p
        WHERE NOT EXISTS (SELECT FROM pg_publication pub WHERE pub.pubname = p.publication)
        LIMIT 1));
BEGIN
    IF drift IS NOT NULL
       AND to_regprocedure('cdc_invalidator.emit_sweep_v1(text, text, text)') IS NOT NULL THEN
        PERFORM cdc_invalidator.emit_sweep_v1(p.schema_name, p.table_name, drift)
        FROM cdc_invalidator.published_v1 p;
        RAISE WARNING 'cdc_invalidator: %: put right, and every table it held is swept', drift;
    END IF;
END
$drift$;
