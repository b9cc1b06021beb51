-- What our install recorded for a table: the columns its trigger function copies, and
-- how many of our four triggers it carries.
SELECT
    (SELECT w.columns FROM cdc_invalidator.watched_v1 w
      WHERE w.relid::oid = to_regclass(%(table)s)::oid) AS watched_columns,
    (SELECT count(*) FROM pg_trigger tg
      WHERE tg.tgrelid = to_regclass(%(table)s)
        AND tg.tgname IN ('cdc_invalidator_ins_v1', 'cdc_invalidator_upd_v1',
                          'cdc_invalidator_del_v1', 'cdc_invalidator_trunc_v1'))::int
        AS triggers
