-- What our install recorded for a table: the columns its trigger function copies, how
-- many of our four triggers it carries, and partitions created since that lack them.
SELECT
    (SELECT w.columns FROM cdc_invalidator.watched_v1 w
      WHERE w.relid::oid = to_regclass(%(table)s)::oid) AS watched_columns,
    (SELECT count(*) FROM pg_trigger tg
      WHERE tg.tgrelid = to_regclass(%(table)s)
        AND tg.tgname IN ('cdc_invalidator_ins_v1', 'cdc_invalidator_upd_v1',
                          'cdc_invalidator_del_v1', 'cdc_invalidator_trunc_v1'))::int
        AS triggers,
    ARRAY(
        SELECT pt.relid::regclass::text FROM pg_partition_tree(to_regclass(%(table)s)) pt
        WHERE pt.relid <> to_regclass(%(table)s)
          AND (SELECT count(*) FROM pg_trigger tg
               WHERE tg.tgrelid = pt.relid AND tg.tgname LIKE 'cdc\_invalidator\_%%\_v1') < 4
        ORDER BY 1) AS unwatched_partitions
