-- What our install recorded for a configured table, against the live catalog: the table
-- (found by name, or by the name its events carry if it was renamed since), the columns
-- its capture function copies and what those columns are called now ('' once dropped),
-- and every way its triggers, or its partitions' triggers, differ from what watch()
-- made: missing, disabled, not firing ALWAYS, or calling another function (and its
-- capture function's owner no longer granted the queue or a function it calls, or a
-- partitioned table's owner not granted its row trigger's function); its inheritance
-- children without our
-- triggers (made after install); the tables
-- it became a partition or an inheritance child of that are not watched (a statement
-- naming one of them fires their statement triggers, not the table's: its changes of
-- the table are not seen); its
-- column filter as watch() compiled it; and whether its capture function sends a one-row
-- change in the NOTIFY payload (notify_payload: its text holds queue_early_v1's call;
-- NULL when the function is missing, which the trigger problems already say), and the
-- bulk_sweep_rows it was compiled with (the N of its `IF statement_rows >= N THEN` and
-- queue_bulk_sweep_v1's INSERT; NULL when off or missing); and the name its events carry.
WITH RECURSIVE w AS (
    SELECT w.relid, w.columns, w.attnums, w.judge, w.filter_columns, w.judged, w.judged_natts,
           w.schema_name, w.table_name
    FROM cdc_invalidator.watched_v1 w
    WHERE w.relid::oid = to_regclass(%(table)s)::oid
       OR (to_regclass(%(table)s) IS NULL
           AND w.schema_name = %(schema)s AND w.table_name = %(name)s)
    LIMIT 1
), heirs (rel) AS (
    -- A plain table's inheritance children, at any depth, but not those watched on their
    -- own, nor theirs (as heirs_v1(), schema.sql, which the listener's role may not run).
    SELECT i.inhrelid FROM w JOIN pg_class c ON c.oid = w.relid
    JOIN pg_inherits i ON i.inhparent = w.relid
    WHERE c.relkind = 'r'
      AND NOT EXISTS (SELECT FROM cdc_invalidator.watched_v1 x WHERE x.relid::oid = i.inhrelid)
    UNION
    SELECT i.inhrelid FROM heirs h JOIN pg_inherits i ON i.inhparent = h.rel
    WHERE NOT EXISTS (SELECT FROM cdc_invalidator.watched_v1 x WHERE x.relid::oid = i.inhrelid)
), rels AS (
    SELECT w.relid AS root, r.rel, r.rel = w.relid AS is_root, c.relkind, c.relispartition,
           quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS label
    FROM w, LATERAL (SELECT w.relid AS rel
                     UNION SELECT pt.relid FROM pg_partition_tree(w.relid) pt
                     -- (not another session's temporary child: install leaves it)
                     UNION SELECT h.rel FROM heirs h JOIN pg_class hc ON hc.oid = h.rel
                     WHERE hc.relpersistence <> 't') r
    JOIN pg_class c ON c.oid = r.rel JOIN pg_namespace n ON n.oid = c.relnamespace
), ancestors (rel) AS (
    -- The tables it is a partition or an inheritance child of, at any depth.
    SELECT i.inhparent FROM w JOIN pg_inherits i ON i.inhrelid = w.relid
    UNION
    SELECT i.inhparent FROM ancestors a JOIN pg_inherits i ON i.inhrelid = a.rel
), expected (name) AS (
    VALUES ('cdc_invalidator_ins_v1'), ('cdc_invalidator_upd_v1'),
           ('cdc_invalidator_del_v1'), ('cdc_invalidator_trunc_v1')
), capture AS (
    -- The capture function's text (no row: it is missing), and whether it sends the
    -- NOTIFY payload: on its own channel, or on the wake-up's (an earlier release's).
    SELECT p.oid, p.proowner, p.proconfig, p.prosrc AS src,
           strpos(p.prosrc, 'PERFORM cdc_invalidator.notify_row_v1(') > 0 AS payload,
           strpos(p.prosrc, 'pg_notify(''cdc_invalidator_v1'', CASE WHEN octet_length') > 0
               AS payload_on_wake_up
    FROM w, pg_proc p
    WHERE p.oid = to_regprocedure(
        'cdc_invalidator.' || quote_ident('capture_' || w.relid::oid || '_v1') || '()')
), statement_triggers AS (
    SELECT rels.*, e.name, tg.tgfoid, tg.tgenabled,
           count(tg.oid) OVER (PARTITION BY rels.rel) AS present,
           quote_ident(pn.nspname) || '.' || quote_ident(p.proname) || '()' AS function,
           'cdc_invalidator.' || quote_ident('capture_' || rels.root::oid || '_v1') || '()'
               AS ours
    FROM rels CROSS JOIN expected e
    LEFT JOIN pg_trigger tg ON tg.tgrelid = rels.rel AND tg.tgname = e.name
    LEFT JOIN pg_proc p ON p.oid = tg.tgfoid
    LEFT JOIN pg_namespace pn ON pn.oid = p.pronamespace
)
SELECT
    (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = w.relid) AS live_name,
    w.columns,
    ARRAY(SELECT coalesce(a.attname::text, '')
          FROM unnest(w.attnums) WITH ORDINALITY AS k (n, i)
          LEFT JOIN pg_attribute a
            ON a.attrelid = w.relid AND a.attnum = k.n AND NOT a.attisdropped
          ORDER BY k.i) AS live_columns,
    w.attnums IS NOT NULL AS has_attnums,
    w.judge, w.filter_columns, w.judged,
    -- ignore_columns: columns added since watch() (judging is off until install).
    w.judged_natts IS NOT NULL
        AND w.judged_natts <> (SELECT c.relnatts FROM pg_class c WHERE c.oid = w.relid)
        AS columns_added,
    ARRAY(
        SELECT s.label FROM statement_triggers s
        WHERE NOT s.is_root AND s.present = 0 AND s.relkind <> 'f' AND s.relispartition
          -- (the capture function dropped: a problem below says so, not this)
          AND to_regprocedure(s.ours) IS NOT NULL
        GROUP BY s.label ORDER BY 1) AS untriggered_partitions,
    -- Inheritance children without triggers (made, or made to inherit, after install):
    -- a statement naming one is not captured.
    ARRAY(
        SELECT s.label FROM statement_triggers s
        WHERE NOT s.is_root AND s.present = 0 AND s.relkind <> 'f' AND NOT s.relispartition
          AND to_regprocedure(s.ours) IS NOT NULL
        GROUP BY s.label ORDER BY 1) AS untriggered_children,
    -- Foreign tables can have no transition tables: an INSERT that the parent's capture
    -- trigger sees routed into one fails.
    ARRAY(
        SELECT r.label FROM rels r WHERE r.relkind = 'f' ORDER BY 1) AS foreign_partitions,
    ARRAY(
        SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
        FROM ancestors a
        JOIN pg_class c ON c.oid = a.rel JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT EXISTS (SELECT FROM cdc_invalidator.watched_v1 x WHERE x.relid::oid = a.rel)
        ORDER BY 1) AS unwatched_parents,
    ARRAY(
        SELECT format('%%s: trigger %%s %%s', s.label, s.name, CASE
            WHEN s.tgfoid IS NULL THEN 'is missing'
            WHEN s.function <> s.ours THEN 'calls ' || s.function || ', not our capture function'
            WHEN s.tgenabled = 'D' THEN 'is disabled'
            ELSE 'does not fire ALWAYS: writes made with session_replication_role = replica '
                 'are not captured' END)
        FROM statement_triggers s
        WHERE (s.is_root OR s.present > 0)
          AND (s.tgfoid IS NULL OR s.tgenabled <> 'A' OR s.function <> s.ours)
        UNION ALL
        -- Its capture function dropped, the table left: DROP OWNED BY ... CASCADE of the
        -- function's owner (the table's owner at install) takes it and the triggers. Or
        -- a dump restored: the table's OID is new, the function's name is not.
        SELECT CASE
            WHEN EXISTS (SELECT FROM pg_trigger tg JOIN pg_proc pr ON pr.oid = tg.tgfoid
                         WHERE tg.tgrelid = w.relid
                           AND pr.pronamespace = 'cdc_invalidator'::regnamespace
                           AND pr.proname ~ '^capture_[0-9]+_v1$')
            THEN format('capture function %%s is missing: its triggers call one named after '
                        'the OID the table had before a dump and restore, and its writes are '
                        'captured; run `cdc-invalidator install` to name it anew', ours)
            ELSE format('capture function %%s was dropped since install (by DROP OWNED BY its '
                        'owner CASCADE?), and the capture triggers with it: %%s', ours,
                        CASE WHEN EXISTS (SELECT FROM pg_trigger tg
                                          WHERE tg.tgrelid = w.relid
                                            AND tg.tgname = 'cdc_invalidator_stand_in_v1')
                             THEN 'the rebuild guard''s stand-in sweeps all of the table''s '
                                  'key templates for every transaction that writes it'
                             ELSE 'its writes are not captured' END)
        END
        FROM (SELECT 'cdc_invalidator.' || quote_ident('capture_' || w.relid::oid || '_v1')
                     || '()' AS ours) named
        WHERE to_regprocedure('cdc_invalidator.' || quote_ident('capture_' || w.relid::oid || '_v1')
                              || '()') IS NULL
          AND EXISTS (SELECT FROM pg_class c WHERE c.oid = w.relid)
        UNION ALL
        -- Its capture function runs as its owner, granted what it needs by install: an
        -- owner changed since (REASSIGN OWNED moves the function, not the grants) makes
        -- every write to the table fail.
        SELECT format('capture function %%s belongs to role %%s, which may not insert into '
                      'the queue (an owner changed since install, e.g. by REASSIGN OWNED): '
                      'every write to the table fails', p.oid::regprocedure,
                      quote_ident(pg_get_userbyid(p.proowner)))
        FROM capture p
        WHERE NOT (has_schema_privilege(p.proowner, 'cdc_invalidator', 'USAGE')
                   AND has_column_privilege(p.proowner, 'cdc_invalidator.queue_v1', 'op',
                                            'INSERT'))
        UNION ALL
        -- ... and runs, on every write, functions PUBLIC may run by default (the list
        -- watch() in schema.sql refuses a table for): one taken away since install (a
        -- hardening script, a new owner, a membership revoked) fails writes, those that
        -- call the advisory lock only while the listener is busy, under load.
        SELECT format('capture function %%s belongs to role %%s, which may not run %%s '
                      '(EXECUTE taken away since install): writes to the table fail (some '
                      'only while the listener is busy): GRANT EXECUTE ON FUNCTION %%s TO %%s',
                      p.oid::regprocedure, quote_ident(pg_get_userbyid(p.proowner)), f.f, f.f,
                      quote_ident(pg_get_userbyid(p.proowner)))
        FROM capture p,
             unnest(ARRAY['pg_catalog.pg_notify(text, text)',
                          'pg_catalog.pg_try_advisory_lock_shared(integer, integer)',
                          'pg_catalog.pg_advisory_unlock_shared(integer, integer)',
                          'pg_catalog.pg_try_advisory_xact_lock_shared(integer, integer)']) f (f)
        WHERE NOT has_function_privilege(p.proowner, f.f, 'EXECUTE')
        UNION ALL
        -- ... and, with the NOTIFY payload compiled in, notify_row_v1() (granted by
        -- watch()), which sends it with pg_notify() as the installing role: either taken
        -- away since (by hand; an installer that had pg_notify() only through a
        -- membership in the table's owner, revoked after install, where a hardened
        -- server granted it to the owners alone) fails every one-row write while the
        -- listener is quiet, and `check` said ok.
        SELECT CASE WHEN NOT has_function_privilege(p.proowner, 'cdc_invalidator.notify_row_v1(text)',
                                                    'EXECUTE')
                    THEN format('capture function %%s belongs to role %%s, which may not run '
                                'cdc_invalidator.notify_row_v1(text) (EXECUTE taken away since '
                                'install): one-row writes to the table fail while the listener '
                                'is quiet',
                                p.oid::regprocedure, quote_ident(pg_get_userbyid(p.proowner)))
                    ELSE format('cdc_invalidator.notify_row_v1(text), which capture function %%s '
                                'calls, belongs to role %%s, which may not run '
                                'pg_catalog.pg_notify(text, text): one-row writes to the table '
                                'fail while the listener is quiet: GRANT EXECUTE ON FUNCTION '
                                'pg_catalog.pg_notify(text, text) TO %%s',
                                p.oid::regprocedure, quote_ident(pg_get_userbyid(n.proowner)),
                                quote_ident(pg_get_userbyid(n.proowner))) END
        FROM capture p, pg_proc n
        WHERE n.oid = to_regprocedure('cdc_invalidator.notify_row_v1(text)')
          AND strpos(p.src, 'cdc_invalidator.notify_row_v1(') > 0
          AND NOT (has_function_privilege(p.proowner, n.oid, 'EXECUTE')
                   AND has_function_privilege(n.proowner, 'pg_catalog.pg_notify(text, text)',
                                              'EXECUTE'))
        UNION ALL
        -- A capture function pinned for a date or float column, without bytea_output
        -- (none of its columns could hold a bytea at install), and a key column retyped
        -- since to one that may: each statement sweeps the table (its probe no longer
        -- plans); compiled by a release without that probe, its keys render in the
        -- writer's bytea_output.
        SELECT format('column %%s was retyped to %%s since install, and capture function '
                      '%%s does not pin bytea_output: %%s: run `cdc-invalidator install`',
                      quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
                      p.oid::regprocedure,
                      CASE WHEN p.src LIKE '%%prints_plain_probe_v1%%'
                           THEN 'each statement that writes the table sweeps its templates'
                           ELSE 'its keys render in the writing session''s bytea_output' END)
        FROM capture p
        JOIN pg_attribute a ON a.attrelid = w.relid AND a.attnum = ANY (w.attnums)
                           AND NOT a.attisdropped
        WHERE EXISTS (SELECT FROM unnest(p.proconfig) g WHERE g LIKE 'TimeZone=%%')
          AND NOT EXISTS (SELECT FROM unnest(p.proconfig) g WHERE g LIKE 'bytea_output=%%')
          AND cdc_invalidator.prints_bytea_v1(a.atttypid)
        UNION ALL
        -- A key column whose type (or a domain's base type) is cast to text by a SQL or
        -- PL function of the database's own that sets no search_path (watch() refuses one;
        -- made since install): the capture function runs it with search_path =
        -- pg_catalog, pg_temp, where it may not find what it names, and every write to
        -- the table fails.
        SELECT format('column %%s is of type %%s, which %%s casts to text: the capture '
                      'function runs it with search_path = pg_catalog, pg_temp, and it sets '
                      'none of its own: writes to the table fail if it names an object '
                      'without its schema: ALTER FUNCTION %%s SET search_path = ...',
                      quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
                      p.oid::regprocedure, p.oid::regprocedure)
        FROM pg_attribute a
        -- (the base type of a domain, through domains over domains: its casts are the
        -- domain's)
        JOIN LATERAL (
            WITH RECURSIVE chain (oid, typtype, typbasetype) AS (
                SELECT t.oid, t.typtype, t.typbasetype FROM pg_type t WHERE t.oid = a.atttypid
                UNION ALL
                SELECT t.oid, t.typtype, t.typbasetype
                FROM chain h JOIN pg_type t ON t.oid = h.typbasetype WHERE h.typtype = 'd')
            SELECT h.oid FROM chain h WHERE h.typtype <> 'd') b ON true
        JOIN pg_cast c ON c.castsource = b.oid
                      AND c.casttarget = 'text'::regtype AND c.castfunc <> 0
        JOIN pg_proc p ON p.oid = c.castfunc
        JOIN pg_language l ON l.oid = p.prolang
        WHERE a.attrelid = w.relid AND a.attnum = ANY (w.attnums) AND NOT a.attisdropped
          AND p.pronamespace <> 'pg_catalog'::regnamespace
          AND l.lanname NOT IN ('c', 'internal')
          AND NOT EXISTS (SELECT FROM unnest(p.proconfig) g WHERE g LIKE 'search_path=%%')
        UNION ALL
        -- PostgreSQL copies the row trigger of a partitioned table onto each partition
        -- created or attached later, and checks EXECUTE on its function as the role doing
        -- it (the table's owner): an owner changed since install makes that fail.
        SELECT format('role %%s, which owns the table, may not execute '
                      'cdc_invalidator.sweep_untriggered_v1() (an owner changed since '
                      'install): creating or attaching a partition fails',
                      quote_ident(pg_get_userbyid(c.relowner)))
        FROM pg_class c
        WHERE c.oid = w.relid AND c.relkind = 'p'
          AND NOT has_function_privilege(c.relowner, 'cdc_invalidator.sweep_untriggered_v1()',
                                         'EXECUTE')
        UNION ALL
        -- A partitioned table's copy of the row trigger never fires: PostgreSQL copies it,
        -- state and all, onto a partition made under it later. Disabled (the install of
        -- an earlier release did so), that partition's writes are not captured.
        SELECT format('%%s: trigger cdc_invalidator_part_v1 is disabled: writes to a '
                      'partition created under it later are not captured', r.label)
        FROM rels r
        JOIN pg_trigger tg ON tg.tgrelid = r.rel AND tg.tgname = 'cdc_invalidator_part_v1'
        WHERE r.relkind = 'p' AND tg.tgenabled <> 'A'
        ORDER BY 1) AS trigger_problems,
    -- (an earlier release's install sent the payload on the wake-up's channel)
    (SELECT f.payload OR f.payload_on_wake_up FROM capture f) AS notify_payload,
    -- (a text longer than any identifier: no column name can hold it)
    (SELECT (regexp_match(f.src, 'IF statement_rows >= ([0-9]+) THEN INSERT INTO '
                                 'cdc_invalidator\.queue_v1 \(schema_name, table_name, op, new_row\) VALUES'))[1]::int
     FROM capture f) AS bulk_sweep_rows,
    -- The name its events carry (install's), NULL where an older release recorded none.
    quote_ident(w.schema_name) || '.' || quote_ident(w.table_name) AS events_name,
    -- Its inheritance children that inherit from another table too, not watched (multiple
    -- inheritance): a statement naming that one changes their rows without firing their
    -- triggers.
    ARRAY(
        SELECT DISTINCT format('%%s (a child of %%s too)', quote_ident(hn.nspname) || '.'
                               || quote_ident(hc.relname), quote_ident(pn.nspname) || '.'
                               || quote_ident(pc.relname))
        FROM heirs h
        JOIN pg_inherits i ON i.inhrelid = h.rel
        JOIN pg_class hc ON hc.oid = h.rel JOIN pg_namespace hn ON hn.oid = hc.relnamespace
        JOIN pg_class pc ON pc.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = pc.relnamespace
        WHERE i.inhparent <> w.relid AND i.inhparent NOT IN (SELECT x.rel FROM heirs x)
          AND NOT EXISTS (SELECT FROM cdc_invalidator.watched_v1 x WHERE x.relid::oid = i.inhparent)
        ORDER BY 1) AS shared_children,
    -- It sends its payload on the wake-up's channel, where any role may LISTEN (an
    -- earlier release's install).
    (SELECT f.payload_on_wake_up FROM capture f) AS payload_on_wake_up
FROM w
