-- Trigger mode: the publications FOR ALL TABLES that publish deletes or updates while
-- the queue or progress_v1 has no replica identity FULL (made after install, which gives
-- them one where such a publication exists): the listener's pruning fails.
SELECT string_agg(quote_ident(p.pubname), ', ' ORDER BY p.pubname)
FROM pg_publication p
WHERE p.puballtables AND (p.pubdelete OR p.pubupdate)
  AND EXISTS (SELECT FROM pg_class c
              WHERE c.oid IN ('cdc_invalidator.queue_v1'::regclass,
                              'cdc_invalidator.progress_v1'::regclass)
                AND c.relreplident <> 'f')
