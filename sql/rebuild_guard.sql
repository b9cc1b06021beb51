-- The rebuild guard (both modes): event triggers for migrations that rebuild a watched
-- table instead of altering it, or move partitions in or out of it, which would
-- otherwise let committed changes go by uninvalidated until the next install:
--   * DROP TABLE of a watched table (or of the table that took its name) deletes every
--     row, and no trigger fires nor any change is decoded: the drop asks for one sweep of
--     the table's templates, in its own transaction, like a TRUNCATE.
--   * A table that takes a watched table's name (CREATE TABLE after a DROP, CREATE TABLE
--     AS, ALTER TABLE ... RENAME TO / SET SCHEMA, as online-migration tools swap a copy
--     in, ALTER INDEX ... RENAME TO of a table, ALTER SCHEMA ... RENAME TO of its schema)
--     is captured by nothing of ours: its rows are not the ones cached, and its writes
--     would not be seen. The command asks for one sweep, and then:
--       trigger mode: the table gets a stand-in: statement triggers (a row trigger too on
--       a partitioned table, which PostgreSQL copies onto its partitions) that queue one
--       sweep of the templates per transaction that writes it (sweep_untriggered_v1). A
--       cold cache, never a stale one, until `install` compiles the table's capture
--       function (watch() drops the stand-in);
--       logical mode: the table is published as install would publish it (recorded in
--       published_v1 under the configured name, its replica identity made to cover the
--       key columns, added to the publication), so its changes are decoded from then on.
--   * Trigger mode: a partition created or attached under a watched partitioned table (or
--     a stand-in) gets a TRUNCATE statement trigger of ours: the table's row trigger
--     reaches the partition's rows, but a TRUNCATE naming the partition fires only the
--     partition's own statement triggers.
--   * Trigger mode: a DROP OWNED BY ... CASCADE that takes a watched table's capture
--     function (and so its capture triggers) and leaves the table gives the table and
--     its partitions the stand-in statement trigger (function_dropped_v1, below).
--   * A partition dropped or detached takes its rows out of the watched table, one
--     attached with rows brings them in, with no row change seen: the command asks for
--     one sweep (members_v1, parts_moved_v1 and parts_dropped_v1, below).
--   * A table made an inheritance child (at any depth) of a watched plain table (CREATE
--     TABLE ... INHERITS, ALTER TABLE ... INHERIT; and the children under it), which
--     install would have treated as it treats a partition (heirs_v1(), schema.sql):
--       trigger mode: it gets the table's four capture triggers (ENABLE ALWAYS, calling
--       the table's capture function), unless it carries those of a watched table it
--       inherits from (heir_of_v1(), below): a statement naming it fires only its own
--       statement triggers;
--       logical mode: it is published as install publishes a child (ONLY and whole, its
--       replica identity made to cover the key columns): PostgreSQL publishes no
--       inheritance child added later. A table in our publication that is no longer
--       configured nor an inheritance child of a published table (NO INHERIT) is taken
--       out of it: its changes would be decoded with nothing to map them to.
--     Its rows joining (INHERIT of a table with rows) or leaving (NO INHERIT, DROP) the
--     table are swept as a partition's are: members_v1 records the children too. A
--     child that left keeps its capture triggers (trigger mode) until install, as a
--     detached partition does.
--   * Trigger mode: capture triggers of ours turned off (DISABLE TRIGGER, ENABLE [REPLICA]
--     TRIGGER: `pg_restore --disable-triggers` around its data) capture nothing, or not
--     every session's writes: the command that turns them on again asks for one sweep
--     (capture_off_v1, schema.sql, keeps what it saw off).
-- A sweep is a queue row in trigger mode (queue_sweep_once_v1), a transactional logical
-- decoding message in logical mode (emit_sweep_v1): both commit or roll back with the
-- DDL. The watched names are those the events carry (watched_v1's and published_v1's
-- schema_name and table_name): a dropped table's row of watched_v1 stays until install
-- runs again; of published_v1, until every logical slot of the database has confirmed
-- past the drop (prune_dropped_v1(), logical.sql, at each later DDL command:
-- forget_dropped_v1(), below).
-- Their work is a catalog look-up of the tables the command touched, and of the watched
-- tables' partitions: no cost to writes. JIT is off in them (SET jit = off): their
-- queries over pg_inherits are planned for as many rows as a table with thousands of
-- partitions has, which passed jit_above_cost, and every DDL statement paid a compile
-- (100 ms instead of 3.5 ms for a CREATE TABLE beside a 4,000-partition table).
-- They fire for every role's DDL and run as their owner (the superuser who installed
-- them), so that a role with no privilege on our schema keeps its DDL working; install
-- marks its own transaction (installing_v1(), schema.sql), and they stand aside. What
-- cannot be done is a WARNING, never a failed migration (`check` then says the table is
-- not watched, or not published).

-- emit_sweep_v1(schema, table, reason): logical mode's sweep of a table's templates,
-- written into the WAL in the current transaction for the listener (pgoutput's
-- `messages`; capture/pgoutput.py reads our prefix).
CREATE OR REPLACE FUNCTION cdc_invalidator.emit_sweep_v1(schema_n text, table_n text, reason text)
RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $emit$
    -- (as UTF-8 bytes: a text message is sent in the server's encoding)
    SELECT FROM pg_logical_emit_message(true, 'cdc_invalidator_v1', convert_to(json_build_object(
        'schema', schema_n, 'table', table_n, 'reason', reason)::text, 'UTF8'));
$emit$;
REVOKE ALL ON FUNCTION cdc_invalidator.emit_sweep_v1(text, text, text) FROM PUBLIC;

-- touched_v1(): in rebuilt_v1's event, the tables the command touched: those it names
-- (ALTER INDEX ... RENAME TO may name a table), and every table of a schema it touched
-- (ALTER SCHEMA ... RENAME TO gives each of them a new qualified name).
-- (ROWS: a command touches a few tables. The planner's default, 1000, made it hash all
-- of pg_class for the queries below, some 40 ms for every ALTER TABLE in a database with
-- a 1,000-partition watched table.)
CREATE OR REPLACE FUNCTION cdc_invalidator.touched_v1()
RETURNS TABLE (rel oid)
LANGUAGE sql ROWS 4 SET search_path = pg_catalog, pg_temp
AS $touched$
    SELECT d.objid FROM pg_event_trigger_ddl_commands() d
    WHERE d.classid = 'pg_catalog.pg_class'::regclass
    UNION
    SELECT c.oid FROM pg_event_trigger_ddl_commands() d
    JOIN pg_class c ON c.relnamespace = d.objid
    WHERE d.classid = 'pg_catalog.pg_namespace'::regclass
$touched$;
REVOKE ALL ON FUNCTION cdc_invalidator.touched_v1() FROM PUBLIC;

-- forget_dropped_v1(mark): logical mode's forgetting of dropped tables, for the guard's
-- event triggers at each DDL command: prune_dropped_v1() (logical.sql), first marking
-- (mark: dropped_v1's sql_drop event) the published tables the command drops
-- (dropped_by), which keep their row for a listener behind the drop. Nothing where
-- prune_dropped_v1() does not exist: trigger mode, or a logical install by an earlier
-- release, which made neither it nor the columns. Never raises: whatever goes wrong is
-- a WARNING, in a block of its own (the caller's sweeps stay; the DDL goes on). The
-- block is here, with its callers, not in prune_dropped_v1(): a trigger-mode install
-- keeps the prune_dropped_v1() an earlier logical install made.
CREATE OR REPLACE FUNCTION cdc_invalidator.forget_dropped_v1(mark boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $forget$
BEGIN
    IF to_regprocedure('cdc_invalidator.prune_dropped_v1()') IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        IF mark THEN
            UPDATE cdc_invalidator.published_v1 p SET dropped_by = pg_current_xact_id()
            WHERE p.relid::oid IN (SELECT d.objid FROM pg_event_trigger_dropped_objects() d
                                   WHERE d.classid = 'pg_catalog.pg_class'::regclass
                                     AND d.objsubid = 0)
              AND p.dropped_by IS NULL;
        END IF;
        PERFORM cdc_invalidator.prune_dropped_v1();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard could not forget dropped tables '
            '(%): their rows stay in published_v1 until `cdc-invalidator install`', SQLERRM;
    END;
END
$forget$;
REVOKE ALL ON FUNCTION cdc_invalidator.forget_dropped_v1(boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION cdc_invalidator.rebuilt_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $rebuilt$
DECLARE
    r      record;
    was    text := coalesce(current_setting('cdc_invalidator.installing', true), '');
    marked boolean;
    bad    text;
    keep_rels   regclass[];
    keep_states text[];
BEGIN
    IF cdc_invalidator.installing_v1() THEN
        RETURN;
    END IF;
    -- Trigger mode: a column the capture function reads by name (a key column, or one a
    -- `columns` filter counts) that is now a virtual generated column (PostgreSQL 18; a
    -- key column dropped and one of its name added, or renamed into its place) cannot be
    -- read from the transition tables: every later write of the table would fail
    -- ("unexpected virtual generated column reference", measured on 18.6). The one DDL
    -- this guard refuses, as watch() refuses such a column and logical mode's guard a
    -- virtual column on a table with REPLICA IDENTITY FULL.
    SELECT format('column %I of table %s', a.attname, a.attrelid::regclass) INTO bad
    FROM cdc_invalidator.touched_v1() t
    JOIN pg_attribute a ON a.attrelid = t.rel AND a.attgenerated = 'v' AND NOT a.attisdropped
    JOIN cdc_invalidator.watched_v1 w
      ON (w.relid::oid = t.rel OR w.relid::oid = ANY (cdc_invalidator.ancestors_v1(t.rel)))
     AND (a.attname::text = ANY (w.columns)
          OR (w.judge = 'columns' AND a.attname::text = ANY (w.filter_columns)))
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator: refused: % would be a virtual generated column, which '
            'the capture triggers read by name and PostgreSQL does not compute in transition '
            'tables: every write of the table would fail', bad
            USING HINT = 'Use the columns it is computed from in the templates (or the column '
                         'filter), or make it a STORED generated column; run '
                         '`cdc-invalidator install`, then this change.',
                  ERRCODE = 'feature_not_supported';
    END IF;
    -- Never a failed migration: whatever goes wrong here is a WARNING.
    BEGIN
        -- The triggers made below are made by ALTER TABLE too, which fires our event
        -- triggers again, for each table: marked as install's (installing_v1()), those
        -- stand aside (else an ATTACH of 1,000 partitions took 15 s). The setting and
        -- the mark are put back as they were after (this may run inside install, before
        -- install marked itself), and with the block on an error.
        marked := cdc_invalidator.mark_install_v1();
        FOR r IN
            -- Tables the command touched that now bear a watched name and carry no trigger
            -- of ours (not the watched table itself; not one that has a stand-in already,
            -- such as after the stand-in's own ALTER TABLE below).
            SELECT DISTINCT c.oid::regclass AS rel, c.relkind, w.schema_name, w.table_name
            FROM cdc_invalidator.touched_v1() t
            JOIN pg_class c ON c.oid = t.rel
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN cdc_invalidator.watched_v1 w
              ON w.schema_name = n.nspname::text AND w.table_name = c.relname::text
            WHERE c.relkind IN ('r', 'p')
              AND NOT EXISTS (SELECT FROM cdc_invalidator.watched_v1 x WHERE x.relid::oid = c.oid)
              AND NOT EXISTS (SELECT FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
                              WHERE tg.tgrelid = c.oid
                                AND p.pronamespace = 'cdc_invalidator'::regnamespace)
        LOOP
            BEGIN
                EXECUTE format('CREATE TRIGGER cdc_invalidator_stand_in_v1 AFTER INSERT OR UPDATE '
                               'OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION '
                               'cdc_invalidator.sweep_untriggered_v1(%L, %L)',
                               r.rel, r.schema_name, r.table_name);
                EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER cdc_invalidator_stand_in_v1', r.rel);
                IF r.relkind = 'p' THEN
                    -- A statement that names a partition fires that partition's statement
                    -- triggers only; a row trigger reaches every partition, present or later
                    -- (their TRUNCATEs: the loop below). Its owner must be able to run the
                    -- function to add partitions.
                    EXECUTE format('CREATE TRIGGER cdc_invalidator_stand_in_row_v1 AFTER INSERT '
                                   'OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION '
                                   'cdc_invalidator.sweep_untriggered_v1(%L, %L)',
                                   r.rel, r.schema_name, r.table_name);
                    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER cdc_invalidator_stand_in_row_v1',
                                   r.rel);
                    PERFORM cdc_invalidator.regrant_sweeps_v1(c.relowner::regrole)
                    FROM pg_class c WHERE c.oid = r.rel;
                END IF;
                PERFORM cdc_invalidator.queue_sweep_once_v1(r.schema_name, r.table_name, format(
                    'table %s took the name of watched table %I.%I after install', r.rel,
                    r.schema_name, r.table_name));
                RAISE WARNING 'cdc_invalidator: table % took the name of a watched table: until '
                    '`cdc-invalidator install` runs again, every transaction that writes it sweeps '
                    'all of the table''s cached keys', r.rel;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'cdc_invalidator: table % took the name of a watched table, and its '
                    'changes are not captured (%): run `cdc-invalidator install`', r.rel, SQLERRM;
            END;
        END LOOP;
        FOR r IN
            -- Partitions created or attached since install under a watched partitioned
            -- table (or a stand-in's): a row trigger of ours reaches their rows, but a
            -- TRUNCATE that names one fires only its own statement triggers, and it has
            -- none of ours, or another watched table's (below). (ATTACH PARTITION names
            -- the parent, CREATE TABLE ... PARTITION OF the partition: the whole tree is
            -- looked at.)
            SELECT DISTINCT ON (p.relid) p.relid::regclass AS rel, w.schema_name, w.table_name
            FROM cdc_invalidator.touched_v1() t
            JOIN pg_class c ON c.oid = t.rel AND (c.relispartition OR c.relkind = 'p')
            -- the touched table and the tables it is a partition of: a watched one (or a
            -- stand-in's) among them, nearest first
            CROSS JOIN LATERAL (SELECT t.rel AS relid, 0 AS depth
                                UNION ALL
                                SELECT a.relid, row_number() OVER () FROM pg_partition_ancestors(t.rel) a
                                WHERE a.relid::oid <> t.rel) up
            JOIN pg_class uc ON uc.oid = up.relid
            JOIN pg_namespace un ON un.oid = uc.relnamespace
            JOIN cdc_invalidator.watched_v1 w
              ON w.relid::oid = up.relid
              OR (w.schema_name, w.table_name) = (un.nspname::text, uc.relname::text)
            -- the touched table, if a partition, and the partitions under it: not the whole
            -- tree, since each ALTER TABLE below fires this function again, for its own
            -- partition (over the whole tree, an ATTACH of 300 partitions took 40 s).
            -- (read from pg_inherits: pg_partition_tree would lock every partition)
            CROSS JOIN LATERAL (SELECT t.rel WHERE c.relispartition
                                UNION
                                SELECT unnest(cdc_invalidator.partitions_v1(t.rel))) AS p(relid)
            JOIN pg_class pc ON pc.oid = p.relid AND pc.relkind IN ('r', 'p')
            -- It lacks a TRUNCATE trigger of ours that sweeps whatever watched table it is
            -- in (cdc_invalidator_part_trunc_v1, a stand-in's: sweep_untriggered_v1), and
            -- the capture trigger of a watched table it is a partition of (members_v1,
            -- brought up to date by parts_moved_v1, which fires first): one detached from
            -- another watched table kept that one's, which queues that one's sweep.
            -- (NOT IN: one hashed pass over pg_trigger. The planner, blind to how many
            -- partitions there are, nested a NOT EXISTS over all of them: 48 ms per DDL
            -- on a partition of a 1,000-partition table. Our triggers found by function
            -- oid: a join with pg_proc by namespace was a nested loop over all of
            -- pg_trigger per function of ours.)
            WHERE p.relid NOT IN (SELECT tg.tgrelid FROM pg_trigger tg
                                  WHERE tg.tgtype & 32 <> 0  -- TRUNCATE
                                    AND tg.tgfoid = 'cdc_invalidator.sweep_untriggered_v1()'::regprocedure
                                  UNION ALL
                                  SELECT tg.tgrelid FROM cdc_invalidator.watched_v1 x
                                  JOIN pg_trigger tg ON tg.tgfoid = to_regprocedure(
                                      format('cdc_invalidator.%I()', 'capture_' || x.relid::oid || '_v1'))
                                  WHERE tg.tgtype & 32 <> 0
                                    AND (tg.tgrelid = x.relid
                                         OR (tg.tgrelid, x.relid) IN (SELECT m.part, m.root
                                                                      FROM cdc_invalidator.members_v1 m)))
              -- Only what this transaction holds a lock on (what its command made or
              -- attached, and their partitions): an ATTACH or DETACH names the root, and
              -- the tree under it holds other sessions' partitions, which one may drop
              -- meanwhile (its name then printed as a bare OID, a syntax error). (A hashed
              -- subplan: pg_locks is read once, and only when a partition lacks one.)
              AND p.relid IN (SELECT unnest(cdc_invalidator.held_v1()))
            ORDER BY p.relid, up.depth
        LOOP
            -- (checked again: the list was read once, before the triggers below)
            CONTINUE WHEN EXISTS (SELECT FROM pg_trigger tg WHERE tg.tgrelid = r.rel
                                    AND tg.tgname = 'cdc_invalidator_part_trunc_v1');
            BEGIN
                EXECUTE format('CREATE TRIGGER cdc_invalidator_part_trunc_v1 AFTER TRUNCATE ON %s '
                               'FOR EACH STATEMENT EXECUTE FUNCTION '
                               'cdc_invalidator.sweep_untriggered_v1(%L, %L)',
                               r.rel, r.schema_name, r.table_name);
                EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER cdc_invalidator_part_trunc_v1',
                               r.rel);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'cdc_invalidator: a TRUNCATE of partition % is not captured (%): run '
                    '`cdc-invalidator install`', r.rel, SQLERRM;
            END;
        END LOOP;
        FOR r IN
            -- Trigger mode: tables the command made inheritance children (CREATE TABLE ...
            -- INHERITS, ALTER TABLE ... INHERIT names the child), at any depth, of a watched
            -- plain table, and the children under them, that lack the capture triggers of
            -- every watched table they inherit from (heir_of_v1(), as heirs_v1() counts
            -- them): a statement naming one fires only its own statement triggers. They get
            -- the nearest one's, as watch() gives them (a child that left another watched
            -- table kept that one's, which capture nothing of this one: replaced).
            SELECT DISTINCT ON (h.rel) h.rel::regclass AS rel, w.relid AS root,
                   format('cdc_invalidator.%I', 'capture_' || w.relid::oid || '_v1') AS fn
            FROM cdc_invalidator.touched_v1() t
            JOIN pg_class c ON c.oid = t.rel AND c.relkind = 'r' AND NOT c.relispartition
            -- (not a watched table's own DDL: it makes no child of it, and its children,
            -- maybe thousands, would each be looked up)
              AND NOT EXISTS (SELECT FROM cdc_invalidator.watched_v1 x WHERE x.relid::oid = t.rel)
            CROSS JOIN LATERAL (SELECT t.rel AS rel
                                UNION SELECT unnest(cdc_invalidator.partitions_v1(t.rel))) h
            JOIN pg_class hc ON hc.oid = h.rel AND hc.relkind = 'r'
            CROSS JOIN LATERAL cdc_invalidator.heir_of_v1(h.rel, ARRAY(
                SELECT x.relid::oid FROM cdc_invalidator.watched_v1 x)) up
            JOIN cdc_invalidator.watched_v1 w ON w.relid::oid = up.root
            WHERE to_regprocedure(format('cdc_invalidator.%I()', 'capture_' || w.relid::oid || '_v1'))
                  IS NOT NULL
              AND NOT EXISTS (SELECT FROM pg_trigger tg
                              WHERE tg.tgrelid = h.rel AND tg.tgname = 'cdc_invalidator_ins_v1'
                                AND tg.tgfoid IN (
                                    SELECT to_regprocedure(format('cdc_invalidator.%I()',
                                                                  'capture_' || u.root || '_v1'))
                                    FROM cdc_invalidator.heir_of_v1(h.rel, ARRAY(
                                        SELECT x.relid::oid FROM cdc_invalidator.watched_v1 x)) u))
            ORDER BY h.rel, up.depth, up.root
        LOOP
            BEGIN
                -- (another watched table's, which it kept when it left that one: replaced)
                PERFORM cdc_invalidator.statement_triggers_v1(r.rel, r.fn);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'cdc_invalidator: statements naming %, an inheritance child of '
                    'watched table %, are not captured (%): run `cdc-invalidator install`',
                    r.rel, r.root::regclass, SQLERRM;
            END;
        END LOOP;
        PERFORM cdc_invalidator.unmark_install_v1(was, marked);
        -- A partitioned table carrying our row trigger that changed owners: the new one
        -- may add partitions.
        PERFORM cdc_invalidator.regrant_sweeps_v1(o.owner)
        FROM (SELECT DISTINCT c.relowner::regrole AS owner
              FROM cdc_invalidator.touched_v1() t JOIN pg_class c ON c.oid = t.rel
              WHERE c.relkind = 'p'
                AND EXISTS (SELECT FROM pg_trigger tg WHERE tg.tgrelid = c.oid
                              AND tg.tgname IN ('cdc_invalidator_part_v1',
                                                'cdc_invalidator_stand_in_row_v1'))) o;
        -- (published_v1 exists only where logical mode was installed.)
        IF to_regclass('cdc_invalidator.published_v1') IS NOT NULL THEN
            FOR r IN
                -- Logical mode: tables that now bear a published name, are not published, and
                -- are not partitions (those are published with their partitioned table).
                SELECT DISTINCT ON (c.oid) c.oid::regclass AS rel, p.schema_name, p.table_name,
                       p.columns, p.keep, p.publication, p.judge
                FROM cdc_invalidator.touched_v1() t
                JOIN pg_class c ON c.oid = t.rel
                JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN cdc_invalidator.published_v1 p
                  ON p.schema_name = n.nspname::text AND p.table_name = c.relname::text
                JOIN pg_publication pub ON pub.pubname = p.publication
                WHERE c.relkind IN ('r', 'p')
                  AND NOT c.relispartition
                  AND NOT EXISTS (SELECT FROM cdc_invalidator.published_v1 x WHERE x.relid::oid = c.oid)
                  AND NOT EXISTS (SELECT FROM pg_publication_rel pr
                                  WHERE pr.prpubid = pub.oid AND pr.prrelid = c.oid)
                ORDER BY c.oid
            LOOP
                PERFORM cdc_invalidator.emit_sweep_v1(r.schema_name, r.table_name, format(
                    'table %s took the name of published table %I.%I after install', r.rel,
                    r.schema_name, r.table_name));
                BEGIN
                    -- The DDL guard stands aside for the identity and publication changes made
                    -- here (a subtransaction: an error puts the setting back too).
                    marked := cdc_invalidator.mark_install_v1();
                    PERFORM cdc_invalidator.record_published(r.rel, r.schema_name, r.table_name,
                                                             r.columns, r.keep, r.publication);
                    UPDATE cdc_invalidator.published_v1 SET judge = r.judge WHERE relid = r.rel;
                    PERFORM cdc_invalidator.cover_identity_v1(r.rel, r.rel, r.columns, r.keep,
                                                              r.judge);
                    PERFORM cdc_invalidator.require_publishable(r.rel);
                    EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', r.publication,
                                   cdc_invalidator.publish_list(r.rel));
                    PERFORM cdc_invalidator.unmark_install_v1(was, marked);
                    RAISE WARNING 'cdc_invalidator: table % took the name of a published table: it is '
                        'published in %, and the table''s cached keys are swept once', r.rel, r.publication;
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'cdc_invalidator: table % took the name of a published table, and its '
                        'changes are not captured (%): run `cdc-invalidator install`', r.rel, SQLERRM;
                END;
            END LOOP;
            FOR r IN
                -- Logical mode: tables the command made inheritance children (at any depth) of
                -- a published plain table, and the children under them, that are not in its
                -- publication: PostgreSQL publishes no child added later. Each is published
                -- as install publishes one (publish()): ONLY and whole, its replica identity
                -- made to cover the table's key columns (refused with `keep` if it has none).
                -- (Temporary and unlogged ones cannot be published: `check` names them.)
                SELECT DISTINCT ON (h.rel) h.rel::regclass AS rel, p.relid AS root,
                       p.columns, p.keep, p.publication, p.judge
                FROM cdc_invalidator.touched_v1() t
                JOIN pg_class c ON c.oid = t.rel AND c.relkind = 'r' AND NOT c.relispartition
                  -- (not a configured table's own DDL, as above)
                  AND NOT EXISTS (SELECT FROM cdc_invalidator.published_v1 x
                                  WHERE x.relid::oid = t.rel)
                CROSS JOIN LATERAL (SELECT t.rel AS rel
                                    UNION SELECT unnest(cdc_invalidator.partitions_v1(t.rel))) h
                JOIN pg_class hc ON hc.oid = h.rel AND hc.relkind = 'r' AND hc.relpersistence = 'p'
                CROSS JOIN LATERAL cdc_invalidator.heir_of_v1(h.rel, ARRAY(
                    SELECT x.relid::oid FROM cdc_invalidator.published_v1 x)) up
                JOIN cdc_invalidator.published_v1 p ON p.relid::oid = up.root
                JOIN pg_publication pub ON pub.pubname = p.publication
                WHERE NOT EXISTS (SELECT FROM pg_publication_rel pr
                                  WHERE pr.prpubid = pub.oid AND pr.prrelid = h.rel)
                ORDER BY h.rel, up.depth, up.root
            LOOP
                BEGIN
                    marked := cdc_invalidator.mark_install_v1();
                    -- (the children under it too: ensure_replica_identity() reaches them)
                    PERFORM cdc_invalidator.cover_identity_v1(r.rel, r.root, r.columns, r.keep,
                                                              r.judge);
                    EXECUTE format('ALTER PUBLICATION %I ADD TABLE ONLY %s', r.publication, r.rel);
                    PERFORM cdc_invalidator.unmark_install_v1(was, marked);
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'cdc_invalidator: %, an inheritance child of published table %, '
                        'is not published, and its changes are not captured (%): run '
                        '`cdc-invalidator install`', r.rel, r.root::regclass, SQLERRM;
                END;
            END LOOP;
            FOR r IN
                -- Logical mode: tables in one of our publications that are neither
                -- configured nor, any longer, an inheritance child of a published table
                -- (ALTER TABLE ... NO INHERIT, at any depth): taken out of it, as a
                -- detached partition leaves with it. Their writes would be decoded with no
                -- configured table to map them to: dead letters. (Their rows leaving the
                -- table swept it: parts_moved_v1.) The identity install gave one stays
                -- until the next install puts it back.
                SELECT DISTINCT h.rel::regclass AS rel, pub.pubname
                FROM cdc_invalidator.touched_v1() t
                JOIN pg_class c ON c.oid = t.rel AND c.relkind = 'r' AND NOT c.relispartition
                  -- (not a configured table's own DDL, as above)
                  AND NOT EXISTS (SELECT FROM cdc_invalidator.published_v1 x
                                  WHERE x.relid::oid = t.rel)
                CROSS JOIN LATERAL (SELECT t.rel AS rel
                                    UNION SELECT unnest(cdc_invalidator.partitions_v1(t.rel))) h
                JOIN pg_publication_rel pr ON pr.prrelid = h.rel
                JOIN pg_publication pub ON pub.oid = pr.prpubid
                WHERE pub.pubname IN (SELECT x.publication FROM cdc_invalidator.published_v1 x)
                  AND NOT EXISTS (SELECT FROM cdc_invalidator.published_v1 x WHERE x.relid::oid = h.rel)
                  AND NOT EXISTS (SELECT FROM cdc_invalidator.heir_of_v1(h.rel, ARRAY(
                                      SELECT x.relid::oid FROM cdc_invalidator.published_v1 x
                                      WHERE x.publication = pub.pubname)))
            LOOP
                BEGIN
                    marked := cdc_invalidator.mark_install_v1();
                    EXECUTE format('ALTER PUBLICATION %I DROP TABLE ONLY %s', r.pubname, r.rel);
                    PERFORM cdc_invalidator.unmark_install_v1(was, marked);
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'cdc_invalidator: %, no longer an inheritance child of a '
                        'published table, stays in publication % (%): its changes will be '
                        'dead letters until `cdc-invalidator install`', r.rel, r.pubname, SQLERRM;
                END;
            END LOOP;
        END IF;
        -- A virtual generated column's expression set in this transaction (ALTER COLUMN
        -- ... SET EXPRESSION, PostgreSQL 18; also one added): every row's value of it
        -- changed, with no rewrite (no table_rewrite event: rewritten_v1 below) and no row
        -- change. Told by its pg_attrdef row, made by this transaction (age 0, or below
        -- for a subtransaction's; a later one of another session that changed the table
        -- before this one locked it: one sweep too many). Logical mode: PostgreSQL refuses
        -- it on a published table. (No attgenerated 'v' before 18: nothing found.)
        FOR r IN
            SELECT DISTINCT x.root FROM cdc_invalidator.touched_v1() t
            JOIN pg_attribute a ON a.attrelid = t.rel AND a.attgenerated = 'v'
                               AND NOT a.attisdropped
            JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            JOIN cdc_invalidator.roots_v1() x
              ON x.root = t.rel OR x.root = ANY (cdc_invalidator.ancestors_v1(t.rel))
            WHERE age(d.xmin) <= 0
        LOOP
            PERFORM cdc_invalidator.sweep_root_v1(r.root, format(
                'the expression of a virtual generated column of table %s was set: its '
                'values changed with no row change seen', r.root::regclass));
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): a table that took a '
            'watched table''s name may not be captured: run `cdc-invalidator check`', SQLERRM;
    END;
    -- Trigger mode: capture triggers of ours that the command turned off or on (DISABLE
    -- TRIGGER, ENABLE [REPLICA | ALWAYS] TRIGGER, of one or ALL). What the table's writers
    -- wrote while they did not fire was not captured, and which rows is not known: their
    -- states are kept in capture_off_v1 while one does not fire ALWAYS, and the command
    -- that changes them again (`pg_restore --disable-triggers` ends its COPY with ENABLE
    -- TRIGGER ALL) queues one sweep of the table's templates. Taking a lock that writers
    -- conflict with, such a command waits for the writers before it and is waited for by
    -- those after it: their changes are all committed before the sweep is queued.
    -- (install turns them on with the guard aside: watch() sweeps then.)
    BEGIN
        FOR r IN
            -- (a table whose triggers of ours are gone since: state NULL, swept if it
            -- was seen off, and forgotten)
            SELECT s.rel, s.state, o.state AS was
            FROM (SELECT DISTINCT t.rel, cdc_invalidator.trigger_states_v1(t.rel) AS state
                  FROM cdc_invalidator.touched_v1() t) s
            LEFT JOIN cdc_invalidator.capture_off_v1 o ON o.relid = s.rel
            WHERE s.state ~ '[^A]' OR o.relid IS NOT NULL
        LOOP
            IF r.was IS DISTINCT FROM r.state AND r.was IS NOT NULL THEN
                PERFORM cdc_invalidator.sweep_root_v1(x.root, format(
                    'capture triggers of table %s were not all there and firing ALWAYS '
                    '(disabled, ENABLE [REPLICA] TRIGGER, dropped or replaced) until this '
                    'command: what was written meanwhile was not captured', r.rel::regclass))
                FROM (SELECT DISTINCT x.root FROM cdc_invalidator.roots_v1() x
                      WHERE x.mode = 't' AND (x.root = r.rel OR x.root = ANY (
                          cdc_invalidator.ancestors_v1(r.rel)))) x;
            END IF;
            IF r.state ~ '[^A]' THEN
                INSERT INTO cdc_invalidator.capture_off_v1 (relid, state) VALUES (r.rel, r.state)
                ON CONFLICT (relid) DO UPDATE SET state = EXCLUDED.state;
            ELSE
                DELETE FROM cdc_invalidator.capture_off_v1 o WHERE o.relid = r.rel;
            END IF;
        END LOOP;
        -- ENABLE TRIGGER ALL of a partition also turns on its copy of the partitioned
        -- table's row trigger, which install keeps off where the partition has capture
        -- triggers of its own (watch()): on, every transaction that wrote the partition
        -- swept all of the table's keys, until install. Off again. Enabling the
        -- partitioned table's (ENABLE [ALWAYS] TRIGGER ALL, USER or by name, of the
        -- table or of a partitioned partition) turns on the copies of every partition
        -- under it: those are looked at too (measured: one UPDATE of ev_1 swept ev:5).
        -- A partition the command named:
        FOR r IN
            SELECT DISTINCT t.rel::regclass AS rel FROM cdc_invalidator.touched_v1() t
            JOIN pg_class c ON c.oid = t.rel AND c.relispartition AND c.relkind = 'r'
            JOIN pg_trigger tg ON tg.tgrelid = t.rel AND tg.tgname = 'cdc_invalidator_part_v1'
                              AND tg.tgparentid <> 0 AND tg.tgenabled <> 'D'
            WHERE cdc_invalidator.has_capture_v1(t.rel)
        LOOP
            marked := cdc_invalidator.mark_install_v1();
            EXECUTE format('ALTER TABLE %s DISABLE TRIGGER cdc_invalidator_part_v1', r.rel);
            PERFORM cdc_invalidator.unmark_install_v1(was, marked);
        END LOOP;
        -- A partitioned table the command named, under which such a copy is on: one
        -- DISABLE of its row trigger (PostgreSQL recurses: an ALTER TABLE of each of a
        -- thousand partitions took 3.5 s here, each firing the event triggers), then ONLY
        -- the others put back as they were: the table's own, a partitioned partition's,
        -- a partition's without statement triggers of ours (made since install).
        FOR r IN
            SELECT DISTINCT t.rel::regclass AS rel FROM cdc_invalidator.touched_v1() t
            JOIN pg_class tc ON tc.oid = t.rel AND tc.relkind = 'p'
            WHERE EXISTS (SELECT FROM pg_trigger x WHERE x.tgrelid = t.rel
                            AND x.tgname = 'cdc_invalidator_part_v1' AND x.tgenabled <> 'D')
              AND EXISTS (
                  -- (the copies that are on first, from pg_trigger, then where they are:
                  -- not each of the table's partitions, +3 ms for an ALTER TABLE of a
                  -- 1,000-partition table)
                  SELECT FROM (SELECT tg.tgrelid FROM pg_trigger tg
                               WHERE tg.tgname = 'cdc_invalidator_part_v1'
                                 AND tg.tgparentid <> 0 AND tg.tgenabled <> 'D' OFFSET 0) x
                  JOIN pg_class c ON c.oid = x.tgrelid AND c.relkind = 'r'
                  WHERE t.rel IN (SELECT a.relid FROM pg_partition_ancestors(x.tgrelid) a)
                    AND cdc_invalidator.has_capture_v1(x.tgrelid))
        LOOP
            SELECT array_agg(tg.tgrelid::regclass), array_agg(tg.tgenabled::text)
            INTO keep_rels, keep_states
            FROM pg_partition_tree(r.rel) pt
            JOIN pg_trigger tg ON tg.tgrelid = pt.relid AND tg.tgname = 'cdc_invalidator_part_v1'
                              AND tg.tgenabled <> 'D'
            WHERE NOT pt.isleaf
               OR NOT cdc_invalidator.has_capture_v1(pt.relid);
            marked := cdc_invalidator.mark_install_v1();
            EXECUTE format('ALTER TABLE %s DISABLE TRIGGER cdc_invalidator_part_v1', r.rel);
            FOR i IN 1 .. coalesce(array_length(keep_rels, 1), 0) LOOP
                EXECUTE format('ALTER TABLE ONLY %s ENABLE %s TRIGGER cdc_invalidator_part_v1',
                               keep_rels[i], CASE keep_states[i] WHEN 'A' THEN 'ALWAYS'
                                                 WHEN 'R' THEN 'REPLICA' ELSE '' END);
            END LOOP;
            PERFORM cdc_invalidator.unmark_install_v1(was, marked);
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): what a table wrote while '
            'capture triggers of ours did not fire may stay cached', SQLERRM;
    END;
    -- Logical mode: forget what was kept of dropped tables that no slot is behind.
    PERFORM cdc_invalidator.forget_dropped_v1(false);
END
$rebuilt$;

CREATE OR REPLACE FUNCTION cdc_invalidator.dropped_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $dropped$
DECLARE
    r record;
BEGIN
    -- Never a failed migration: whatever goes wrong here is a WARNING.
    BEGIN
        FOR r IN
            -- The watched table, or the table that took its name since (the stand-in's).
            SELECT DISTINCT w.schema_name, w.table_name, d.object_identity
            FROM pg_event_trigger_dropped_objects() d
            JOIN cdc_invalidator.watched_v1 w
              ON w.relid::oid = d.objid
              OR (w.schema_name = d.schema_name AND w.table_name = d.object_name)
            WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objsubid = 0
              AND d.object_type = 'table'
        LOOP
            PERFORM cdc_invalidator.queue_sweep_once_v1(r.schema_name, r.table_name,
                format('table %s was dropped', r.object_identity));
        END LOOP;
        IF to_regclass('cdc_invalidator.published_v1') IS NOT NULL THEN
            FOR r IN
                -- Logical mode: the published table, or the table that took its name since.
                SELECT DISTINCT p.schema_name, p.table_name, d.object_identity
                FROM pg_event_trigger_dropped_objects() d
                JOIN cdc_invalidator.published_v1 p
                  ON p.relid::oid = d.objid
                  OR (p.schema_name = d.schema_name AND p.table_name = d.object_name)
                WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objsubid = 0
                  AND d.object_type = 'table'
                  AND EXISTS (SELECT FROM pg_publication pub WHERE pub.pubname = p.publication)
            LOOP
                PERFORM cdc_invalidator.emit_sweep_v1(r.schema_name, r.table_name,
                    format('table %s was dropped', r.object_identity));
            END LOOP;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): the cached keys of a '
            'dropped watched table may stay cached: delete them by hand', SQLERRM;
    END;
    -- Logical mode: forget what was kept of dropped tables that no slot is behind; a
    -- published table dropped now keeps its row for a listener behind the drop, marked.
    PERFORM cdc_invalidator.forget_dropped_v1(true);
    IF TG_TAG = 'DROP OWNED' THEN
        BEGIN
            PERFORM cdc_invalidator.function_dropped_v1();
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): a watched table whose '
                'capture function was dropped is not captured: run `cdc-invalidator install`',
                SQLERRM;
        END;
    END IF;
END
$dropped$;

-- function_dropped_v1(): in dropped_v1's event, a DROP OWNED BY ... CASCADE that took a
-- watched table's capture function and left the table: the function belongs to the
-- table's owner at install, and after an ALTER TABLE ... OWNER TO still to the old one,
-- whose DROP OWNED drops it, and with it every capture trigger of the table and its
-- partitions. Their writes would go by uncaptured: each of those tables gets the stand-in
-- statement trigger (sweep_untriggered_v1), which queues one sweep of the templates per
-- transaction that writes it, a cold cache and never a stale one, until `install`
-- compiles the function again (as the new owner's) and drops it. (Partitions made later
-- get the table's row trigger, which sweeps, as they do without this.)
CREATE OR REPLACE FUNCTION cdc_invalidator.function_dropped_v1()
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $function_dropped$
DECLARE
    r      record;
    was    text := coalesce(current_setting('cdc_invalidator.installing', true), '');
    marked boolean;
BEGIN
    IF cdc_invalidator.installing_v1() THEN
        RETURN;
    END IF;
    -- (our CREATE TRIGGER and ALTER TABLE below fire our event triggers again)
    marked := cdc_invalidator.mark_install_v1();
    FOR r IN
        SELECT rel.relid::regclass AS rel, w.schema_name, w.table_name
        FROM pg_event_trigger_dropped_objects() d
        JOIN cdc_invalidator.watched_v1 w
          ON d.object_identity = format('cdc_invalidator.%I()', 'capture_' || w.relid::oid || '_v1')
        CROSS JOIN LATERAL (SELECT w.relid::oid AS relid
                            UNION SELECT unnest(cdc_invalidator.partitions_v1(w.relid::oid))) rel
        JOIN pg_class c ON c.oid = rel.relid AND c.relkind IN ('r', 'p')
        WHERE d.classid = 'pg_catalog.pg_proc'::regclass
          AND NOT EXISTS (SELECT FROM pg_trigger tg WHERE tg.tgrelid = rel.relid
                            AND tg.tgname IN ('cdc_invalidator_ins_v1',
                                              'cdc_invalidator_stand_in_v1'))
    LOOP
        EXECUTE format('CREATE TRIGGER cdc_invalidator_stand_in_v1 AFTER INSERT OR UPDATE '
                       'OR DELETE OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION '
                       'cdc_invalidator.sweep_untriggered_v1(%L, %L, %L)',
                       r.rel, r.schema_name, r.table_name,
                       'its capture triggers were dropped with their function after install '
                       '(DROP OWNED BY its old owner CASCADE?)');
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER cdc_invalidator_stand_in_v1', r.rel);
        RAISE WARNING 'cdc_invalidator: the capture triggers of % went with their function: '
            'until `cdc-invalidator install` runs again, every transaction that writes it '
            'sweeps all of the cached keys of %.%', r.rel,
            quote_ident(r.schema_name), quote_ident(r.table_name);
    END LOOP;
    PERFORM cdc_invalidator.unmark_install_v1(was, marked);
END
$function_dropped$;
REVOKE ALL ON FUNCTION cdc_invalidator.function_dropped_v1() FROM PUBLIC;

-- The partitions of watched partitioned tables: a partition's rows leave the table when it
-- is dropped (DROP TABLE, or any DROP ... CASCADE that takes it: a schema, an owner, a
-- foreign server, a function its partition key uses) or detached (DETACH PARTITION, also
-- CONCURRENTLY and FINALIZE), and join it when a table holding rows is attached (or a
-- foreign table made a partition), with no row change that a trigger sees or that is
-- decoded. Once a partition is dropped nothing in the catalog says whose it was, so
-- members_v1 records it: install fills it (sync_members_v1), and so do the commands that
-- add partitions (parts_moved_v1). A command that takes a recorded partition away, or
-- adds one holding rows, asks for one sweep of the table's templates, in its own
-- transaction (DETACH ... CONCURRENTLY: its last one).

-- members_v1: each partition, at any depth, of each watched partitioned table, and each
-- inheritance child, at any depth, of each watched plain table (or of a table that took
-- a watched name: a stand-in); `root` is that table. (A child configured on its own is
-- recorded too: its rows are the root's as well.) (regclass, as
-- watched_v1's relid: pg_dump writes names, so a restore keeps the record true.)
CREATE TABLE IF NOT EXISTS cdc_invalidator.members_v1 (
    part regclass NOT NULL,
    root regclass NOT NULL,
    PRIMARY KEY (part, root)
);
DO $members_root$
BEGIN
    -- (made with oid columns by a development build: made regclass, so that a restore
    -- keeps it true)
    IF (SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = 'cdc_invalidator.members_v1'::regclass
          AND a.attname = 'part') = 'oid'::regtype THEN
        ALTER TABLE cdc_invalidator.members_v1
            ALTER COLUMN part TYPE regclass, ALTER COLUMN root TYPE regclass;
    END IF;
    IF to_regclass('cdc_invalidator.members_v1_root') IS NULL THEN  -- (as the queue's)
        CREATE INDEX members_v1_root ON cdc_invalidator.members_v1 (root);
    END IF;
    -- Readable by anyone who may use our schema (the listener's role, for `check`): it
    -- holds table OIDs, which pg_inherits shows everyone anyway. Granted once.
    IF NOT has_table_privilege('public', 'cdc_invalidator.members_v1', 'SELECT') THEN
        GRANT SELECT ON TABLE cdc_invalidator.members_v1 TO PUBLIC;
    END IF;
END
$members_root$;

-- bearers_v1(relid, schema, table): the partitioned and plain tables among the watched
-- table `relid` and the one that bears its name now (a stand-in), each found by its
-- index. (A plain table's members are its inheritance children.)
CREATE OR REPLACE FUNCTION cdc_invalidator.bearers_v1(relid oid, schema_n text, table_n text)
RETURNS TABLE (oid oid)
LANGUAGE sql STABLE ROWS 1 SET search_path = pg_catalog, pg_temp
AS $bearers$
    SELECT c.oid FROM pg_class c WHERE c.oid = relid AND c.relkind IN ('p', 'r')
    UNION
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relname = table_n::name AND n.nspname = schema_n::name AND c.relkind IN ('p', 'r')
$bearers$;
REVOKE ALL ON FUNCTION cdc_invalidator.bearers_v1(oid, text, text) FROM PUBLIC;

-- roots_v1(): the partitioned and plain tables whose partitions or inheritance children
-- members_v1 records, with the name
-- their events carry and the mode ('t': watched_v1, a queue row; 'l': published_v1, a
-- logical decoding message): each watched one, and each that bears a watched name.
CREATE OR REPLACE FUNCTION cdc_invalidator.roots_v1()
RETURNS TABLE (root oid, mode "char", schema_name text, table_name text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $roots$
BEGIN
    RETURN QUERY
    SELECT b.oid, 't'::"char", w.schema_name, w.table_name
    FROM cdc_invalidator.watched_v1 w
    CROSS JOIN LATERAL cdc_invalidator.bearers_v1(w.relid::oid, w.schema_name, w.table_name) b;
    -- (published_v1 exists only where logical mode was installed.)
    IF to_regclass('cdc_invalidator.published_v1') IS NOT NULL THEN
        RETURN QUERY
        SELECT b.oid, 'l'::"char", p.schema_name, p.table_name
        FROM cdc_invalidator.published_v1 p
        CROSS JOIN LATERAL cdc_invalidator.bearers_v1(p.relid::oid, p.schema_name, p.table_name) b
        WHERE EXISTS (SELECT FROM pg_publication pub WHERE pub.pubname = p.publication);
    END IF;
END
$roots$;
REVOKE ALL ON FUNCTION cdc_invalidator.roots_v1() FROM PUBLIC;

-- sweep_root_v1(root, reason): one sweep of the templates of each name `root` is watched
-- under (a root no longer watched: none).
CREATE OR REPLACE FUNCTION cdc_invalidator.sweep_root_v1(root_rel oid, reason text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $sweep_root$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT x.mode, x.schema_name, x.table_name
             FROM cdc_invalidator.roots_v1() x WHERE x.root = root_rel LOOP
        IF r.mode = 't' THEN
            PERFORM cdc_invalidator.queue_sweep_once_v1(r.schema_name, r.table_name, reason);
        ELSE
            PERFORM cdc_invalidator.emit_sweep_v1(r.schema_name, r.table_name, reason);
        END IF;
    END LOOP;
END
$sweep_root$;
REVOKE ALL ON FUNCTION cdc_invalidator.sweep_root_v1(oid, text) FROM PUBLIC;

-- holds_rows_v1(rel, unheld, held): whether a partition that left or joined a table may
-- hold rows, told without reading it: these functions run as a superuser, and a query of
-- the table would plan its owner's index expressions and predicates, running the owner's
-- functions with our rights. A partitioned one: no (its leaves are asked); one gone
-- (dropped while nothing saw it): yes; one this transaction holds no lock on (not in
-- `held`, held_v1() read once per command: pg_locks is a scan of the whole lock table):
-- `unheld` (another session's command moved it, and swept for it; or its size says
-- nothing of this command); a foreign one: yes (it is on another server); a table: if it
-- has pages (rows deleted and not vacuumed count: a sweep too many, never one too few).
DROP FUNCTION IF EXISTS cdc_invalidator.holds_rows_v1(oid, boolean);  -- (a development build's)
CREATE OR REPLACE FUNCTION cdc_invalidator.holds_rows_v1(rel oid, unheld boolean, held oid[])
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $holds$
    SELECT CASE
        WHEN c.oid IS NULL THEN true
        WHEN c.relkind = 'p' THEN false
        WHEN c.oid <> ALL (held) THEN unheld
        WHEN c.relkind = 'f' THEN true
        ELSE pg_relation_size(c.oid) > 0 END
    FROM (SELECT rel) r LEFT JOIN pg_class c ON c.oid = r.rel
$holds$;
REVOKE ALL ON FUNCTION cdc_invalidator.holds_rows_v1(oid, boolean, oid[]) FROM PUBLIC;

-- held_v1(): the relations of this database this backend holds a lock on.
CREATE OR REPLACE FUNCTION cdc_invalidator.held_v1()
RETURNS oid[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $held$
    SELECT coalesce(array_agg(DISTINCT l.relation), '{}') FROM pg_locks l
    WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted
      AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
$held$;
REVOKE ALL ON FUNCTION cdc_invalidator.held_v1() FROM PUBLIC;

-- sync_members_v1(roots, sweep): members_v1 made to match pg_inherits for `roots` (NULL:
-- every root, and the rows of tables no longer roots go). It writes only what differs
-- (install runs it every time), in one statement per root, so that pg_inherits and
-- members_v1 are read in one snapshot: a partition another session adds or takes away
-- meanwhile is in both or in neither. With `sweep`, a root that lost a partition that may
-- hold rows (detached; an empty one detached sweeps nothing but in logical mode, see
-- below), or gained one that this transaction holds and that holds rows (attached), is
-- swept (holds_rows_v1).
CREATE OR REPLACE FUNCTION cdc_invalidator.sync_members_v1(roots oid[], sweep boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $sync$
DECLARE
    r      record;
    lost   oid[];
    gained oid[];
    held   oid[];
BEGIN
    IF roots IS NULL THEN
        DELETE FROM cdc_invalidator.members_v1 m
        WHERE m.root NOT IN (SELECT x.root FROM cdc_invalidator.roots_v1() x);
    END IF;
    FOR r IN SELECT x.root, bool_or(x.mode = 'l') AS logical FROM cdc_invalidator.roots_v1() x
             WHERE roots IS NULL OR x.root = ANY (roots) GROUP BY x.root LOOP
        WITH now AS (
            SELECT unnest(cdc_invalidator.partitions_v1(r.root)) AS part),
        gone AS (
            DELETE FROM cdc_invalidator.members_v1 m
            WHERE m.root = r.root AND m.part NOT IN (SELECT part FROM now)
            RETURNING m.part::oid AS part),
        added AS (
            INSERT INTO cdc_invalidator.members_v1 (part, root)
            SELECT n.part, r.root FROM now n
            WHERE NOT EXISTS (SELECT FROM cdc_invalidator.members_v1 m
                              WHERE m.part = n.part AND m.root = r.root)
            ON CONFLICT DO NOTHING
            RETURNING part::oid AS part)
        SELECT ARRAY(SELECT part FROM gone), ARRAY(SELECT part FROM added) INTO lost, gained;
        CONTINUE WHEN NOT sweep OR cardinality(lost) + cardinality(gained) = 0;
        held := coalesce(held, cdc_invalidator.held_v1());
        -- (a partitioned one lost is asked through its partitions now, recorded or not)
        -- In logical mode one this command detached is swept even when empty now: its
        -- changes made before, decoded after it left, can no longer be told to be the
        -- table's (the listener finds no table of theirs: dead letters, keys cached).
        IF EXISTS (SELECT FROM (SELECT unnest(lost) AS o
                                UNION SELECT unnest(cdc_invalidator.partitions_v1(c.oid))
                                FROM unnest(lost) x JOIN pg_class c ON c.oid = x AND c.relkind = 'p') l
                   WHERE cdc_invalidator.holds_rows_v1(l.o, true, held)
                      OR (r.logical AND l.o = ANY (held))) THEN
            PERFORM cdc_invalidator.sweep_root_v1(r.root, format(
                CASE WHEN (SELECT c.relkind FROM pg_class c WHERE c.oid = r.root) = 'r'
                     THEN '%s inheritance child(ren) left table %s (%s%s)'
                     ELSE '%s partition(s) of table %s detached (%s%s)' END,
                cardinality(lost), r.root::regclass,
                -- (ten names at most: a reason is logged and stored with the sweep)
                (SELECT string_agg(o::regclass::text, ', ') FROM (SELECT unnest(lost[1:10]) o) x),
                CASE WHEN cardinality(lost) > 10 THEN ', ...' ELSE '' END));
        ELSIF EXISTS (SELECT FROM unnest(gained) g
                      WHERE cdc_invalidator.holds_rows_v1(g, false, held)) THEN
            PERFORM cdc_invalidator.sweep_root_v1(r.root, format(
                '%s holding rows joined table %s',
                CASE WHEN (SELECT c.relkind FROM pg_class c WHERE c.oid = r.root) = 'r'
                     THEN 'an inheritance child' ELSE 'a partition' END, r.root::regclass));
        END IF;
    END LOOP;
END
$sync$;
REVOKE ALL ON FUNCTION cdc_invalidator.sync_members_v1(oid[], boolean) FROM PUBLIC;

-- heir_of_v1(rel, roots): the tables of `roots` (configured plain tables) whose
-- inheritance child `rel` is, at any depth, as heirs_v1() counts them: not through a
-- table of `roots` (one configured on its own keeps its children), and none for a table
-- of `roots` itself; with the depth, nearest first.
CREATE OR REPLACE FUNCTION cdc_invalidator.heir_of_v1(rel oid, roots oid[])
RETURNS TABLE (root oid, depth int)
LANGUAGE sql STABLE ROWS 1 SET search_path = pg_catalog, pg_temp
AS $heir_of$
    WITH RECURSIVE up (relid, depth) AS (
        SELECT i.inhparent, 1 FROM pg_inherits i
        WHERE i.inhrelid = rel AND rel <> ALL (roots)
        UNION ALL
        SELECT i.inhparent, u.depth + 1 FROM up u JOIN pg_inherits i ON i.inhrelid = u.relid
        WHERE u.relid <> ALL (roots) AND u.depth < 100)
    SELECT u.relid, min(u.depth)::int FROM up u
    JOIN pg_class c ON c.oid = u.relid AND c.relkind = 'r'
    WHERE u.relid = ANY (roots)
    GROUP BY u.relid ORDER BY 2, 1
$heir_of$;
REVOKE ALL ON FUNCTION cdc_invalidator.heir_of_v1(oid, oid[]) FROM PUBLIC;

-- parts_moved_v1 (ddl_command_end of CREATE TABLE, CREATE FOREIGN TABLE, ALTER TABLE,
-- and of CREATE SCHEMA, ALTER SCHEMA, ALTER INDEX, which can make or rename a table):
--   * a partitioned table the command touched, in a watched tree (ATTACH and DETACH name
--     the parent): the trees above it are compared with the record (sync_members_v1);
--   * a partition not recorded yet (CREATE TABLE ... PARTITION OF names the partition):
--     its own rows are added, reading no others (so that two sessions creating partitions
--     neither wait on each other nor, SERIALIZABLE, fail each other), and it is swept for
--     if it may hold rows (a foreign table);
--   * an inheritance child the command touched, or one recorded (CREATE TABLE ...
--     INHERITS, ALTER TABLE ... INHERIT and NO INHERIT name the child): the watched plain
--     tables it inherits from now, and those it was recorded under, are compared with the
--     record (sync_members_v1): a child holding rows that joined, or one that left, sweeps.
-- A command on a recorded leaf partition, or on a table outside every watched tree,
-- costs a look-up of it only (an inheritance child: the compare of its trees).
CREATE OR REPLACE FUNCTION cdc_invalidator.parts_moved_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $moved$
DECLARE
    roots oid[];
    r     record;
BEGIN
    IF cdc_invalidator.installing_v1() THEN
        RETURN;  -- (install syncs members_v1 itself)
    END IF;
    -- Never a failed migration: whatever goes wrong here is a WARNING.
    BEGIN
        IF NOT EXISTS (SELECT FROM cdc_invalidator.touched_v1() t JOIN pg_class c ON c.oid = t.rel
                       WHERE c.relkind = 'p' OR c.relispartition
                          -- an inheritance child, now or (recorded) before the command
                          OR (c.relkind IN ('r', 'f')
                              AND (EXISTS (SELECT FROM pg_inherits i WHERE i.inhrelid = c.oid)
                                   OR EXISTS (SELECT FROM cdc_invalidator.members_v1 m
                                              WHERE m.part = c.oid)))) THEN
            RETURN;  -- (most DDL: no partition tree, nor inheritance child, touched)
        END IF;
        FOR r IN
            SELECT DISTINCT c.oid AS part, x.root
            FROM cdc_invalidator.touched_v1() t
            JOIN pg_class c ON c.oid = t.rel AND c.relispartition AND c.relkind <> 'p'
            CROSS JOIN LATERAL pg_partition_ancestors(t.rel) a
            JOIN cdc_invalidator.roots_v1() x ON x.root = a.relid
            WHERE NOT EXISTS (SELECT FROM cdc_invalidator.members_v1 m
                              WHERE m.part = c.oid AND m.root = x.root)
        LOOP
            INSERT INTO cdc_invalidator.members_v1 (part, root) VALUES (r.part, r.root)
            ON CONFLICT DO NOTHING;
            IF cdc_invalidator.holds_rows_v1(r.part, false, cdc_invalidator.held_v1()) THEN
                PERFORM cdc_invalidator.sweep_root_v1(r.root, format(
                    'partition %s holding rows joined table %s', r.part::regclass,
                    r.root::regclass));
            END IF;
        END LOOP;
        SELECT array_agg(DISTINCT x.root) INTO roots
        FROM (SELECT up.relid
              FROM cdc_invalidator.touched_v1() t
              JOIN pg_class c ON c.oid = t.rel AND c.relkind = 'p'
              CROSS JOIN LATERAL (SELECT t.rel AS relid
                                  UNION SELECT a.relid FROM pg_partition_ancestors(t.rel) a) up
              UNION
              -- An inheritance child (INHERIT and NO INHERIT name the child): the plain
              -- tables it inherits from now, and those it was recorded under before.
              SELECT a.relid
              FROM cdc_invalidator.touched_v1() t
              JOIN pg_class c ON c.oid = t.rel AND c.relkind IN ('r', 'f')
              CROSS JOIN LATERAL unnest(cdc_invalidator.ancestors_v1(t.rel)) AS a (relid)
              UNION
              SELECT m.root::oid
              FROM cdc_invalidator.touched_v1() t
              JOIN cdc_invalidator.members_v1 m ON m.part = t.rel) up
        JOIN cdc_invalidator.roots_v1() x ON x.root = up.relid;
        IF roots IS NOT NULL THEN
            PERFORM cdc_invalidator.sync_members_v1(roots, true);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): a partition this command '
            'detached, or attached with rows, may leave its keys cached: run `cdc-invalidator '
            'install`, and sweep the table''s keys', SQLERRM;
    END;
END
$moved$;
REVOKE ALL ON FUNCTION cdc_invalidator.parts_moved_v1() FROM PUBLIC;

-- parts_dropped_v1 (sql_drop, of every command): recorded partitions dropped sweep the
-- tables they belonged to, unless those went too (dropped_v1 sweeps a dropped watched
-- table). Its cost is a look-up of the dropped tables in members_v1.
CREATE OR REPLACE FUNCTION cdc_invalidator.parts_dropped_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $parts_dropped$
DECLARE
    r record;
BEGIN
    -- Never a failed migration: whatever goes wrong here is a WARNING.
    BEGIN
        FOR r IN
            WITH dropped AS (
                SELECT d.objid, d.object_identity FROM pg_event_trigger_dropped_objects() d
                WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objsubid = 0
                  AND d.object_type IN ('table', 'foreign table')),
            -- (two deletes, each by its index: this runs for every DROP in the database)
            roots_gone AS (
                DELETE FROM cdc_invalidator.members_v1 m
                WHERE m.root::oid = ANY (ARRAY(SELECT objid FROM dropped))),
            gone AS (
                DELETE FROM cdc_invalidator.members_v1 m
                WHERE m.part::oid = ANY (ARRAY(SELECT objid FROM dropped))
                RETURNING m.root::oid AS root, m.part::oid AS part)
            -- (ten names at most: a reason is logged and stored with the sweep)
            SELECT g.root, count(*) AS n,
                   (array_agg(d.object_identity ORDER BY d.object_identity))[1:10] AS parts
            FROM gone g JOIN dropped d ON d.objid = g.part
            WHERE EXISTS (SELECT FROM pg_class c WHERE c.oid = g.root)
            GROUP BY g.root
        LOOP
            PERFORM cdc_invalidator.sweep_root_v1(r.root, format(
                '%s partition(s) of table %s dropped (%s%s)', r.n, r.root::regclass,
                array_to_string(r.parts, ', '), CASE WHEN r.n > 10 THEN ', ...' ELSE '' END));
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): the cached keys of a '
            'dropped partition may stay cached: sweep the table''s keys', SQLERRM;
    END;
END
$parts_dropped$;
REVOKE ALL ON FUNCTION cdc_invalidator.parts_dropped_v1() FROM PUBLIC;

-- rewritten_v1 (table_rewrite): a command that rewrites a table's column values in
-- place changes every row with no row change a trigger sees or decoding sends: ALTER
-- COLUMN ... SET EXPRESSION of a stored generated column (PostgreSQL 17+; a rewrite for
-- AT_REWRITE_DEFAULT_VAL, 2, as a column added with a volatile default or a stored
-- generated column added, whose values the cached rows lack), ALTER COLUMN ... TYPE ...
-- USING (AT_REWRITE_COLUMN_REWRITE, 4). A rewrite for either reason of a watched table
-- (or of a partition or inheritance child of one) asks for one sweep of the table's
-- templates, in the command's transaction, once per transaction and table. A retype
-- whose text is the same (int to bigint) sweeps too: a cold cache, never a stale one.
-- Rewrites for SET LOGGED/UNLOGGED (1) or SET ACCESS METHOD (8) keep the values.
-- Each partition of a partitioned table is rewritten on its own, and asks once: the
-- tables swept for are recorded in rewrite_sweeps_v1, by transaction, which only the
-- role that installed (the event trigger's) writes. A session setting did it, which
-- any role can set (SET cdc_invalidator.rewrite_swept = ',<oid>,'): a table's owner,
-- or a function its migration ran, skipped the sweep, and every cached key of the
-- rewritten rows stayed. A row of a transaction that ended counts for nothing (the
-- xid is this transaction's and its xmin is this transaction's or a subtransaction's,
-- as install_marks_v1); install deletes them (one a transaction that rewrote a
-- watched table: a few bytes a migration).
CREATE TABLE IF NOT EXISTS cdc_invalidator.rewrite_sweeps_v1 (
    xid  xid8 NOT NULL,
    root oid NOT NULL,
    PRIMARY KEY (xid, root)
);
REVOKE ALL ON TABLE cdc_invalidator.rewrite_sweeps_v1 FROM PUBLIC;
DELETE FROM cdc_invalidator.rewrite_sweeps_v1 WHERE xid <> pg_current_xact_id();

CREATE OR REPLACE FUNCTION cdc_invalidator.rewritten_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $rewritten$
DECLARE
    rel   oid;
    tbl   oid;
    fresh boolean;
    ours  boolean;
BEGIN
    IF cdc_invalidator.installing_v1() THEN
        RETURN;
    END IF;
    -- Never a failed migration: whatever goes wrong here is a WARNING.
    BEGIN
        IF pg_event_trigger_table_rewrite_reason() & 6 = 0 THEN
            RETURN;
        END IF;
        rel := pg_event_trigger_table_rewrite_oid();
        -- Most rewrites are of a table nothing of ours watches: the table and its
        -- ancestors are looked up in watched_v1 (and published_v1) by oid and by name
        -- first. roots_v1() alone expands every watched table, a call of bearers_v1()
        -- each: with 500 watched tables, an ALTER COLUMN ... TYPE of a 10-row unwatched
        -- table took 15.2 ms instead of 3.0 ms (PG 15, by hand).
        ours := EXISTS (
            SELECT FROM (SELECT rel AS relid
                         UNION SELECT unnest(cdc_invalidator.ancestors_v1(rel))) up
            JOIN pg_class c ON c.oid = up.relid JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN cdc_invalidator.watched_v1 w
              ON w.relid::oid = up.relid
              OR (w.schema_name, w.table_name) = (n.nspname::text, c.relname::text));
        -- (published_v1 exists only where logical mode was installed)
        IF NOT ours AND to_regclass('cdc_invalidator.published_v1') IS NOT NULL THEN
            ours := EXISTS (
                SELECT FROM (SELECT rel AS relid
                             UNION SELECT unnest(cdc_invalidator.ancestors_v1(rel))) up
                JOIN pg_class c ON c.oid = up.relid
                JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN cdc_invalidator.published_v1 p
                  ON p.relid::oid = up.relid
                  OR (p.schema_name, p.table_name) = (n.nspname::text, c.relname::text));
        END IF;
        IF NOT ours THEN
            RETURN;
        END IF;
        FOR tbl IN
            SELECT DISTINCT x.root FROM cdc_invalidator.roots_v1() x
            WHERE x.root = rel OR x.root = ANY (cdc_invalidator.ancestors_v1(rel))
        LOOP
            -- (no read of the table first: only a row already there, this one's or one
            -- another cluster's counter left, is looked at)
            fresh := NULL;
            INSERT INTO cdc_invalidator.rewrite_sweeps_v1 (xid, root)
            VALUES (pg_current_xact_id(), tbl)
            ON CONFLICT DO NOTHING RETURNING true INTO fresh;
            CONTINUE WHEN fresh IS NULL AND EXISTS (
                SELECT FROM cdc_invalidator.rewrite_sweeps_v1 s
                WHERE s.xid = pg_current_xact_id() AND s.root = tbl AND age(s.xmin) <= 0);
            PERFORM cdc_invalidator.sweep_root_v1(tbl, format(
                'table %s rewritten by %s: its column values changed with no row change '
                'seen', tbl::regclass, TG_TAG));
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): the cached keys of a '
            'rewritten table may stay cached: sweep the table''s keys', SQLERRM;
    END;
END
$rewritten$;
REVOKE ALL ON FUNCTION cdc_invalidator.rewritten_v1() FROM PUBLIC;

-- held_enums_v1(rels): the enum types a value of a column of `rels` (or of their
-- partitions and inheritance children) may hold: the column's type, or one it is a
-- domain, array, range, multirange (pg_range.rngmultitypid, PostgreSQL 14+: read as
-- JSON, which a server without it parses too) or composite type over, a table's row
-- type included, at any depth. Each type is looked up by its oid: the cost is the
-- columns', not the catalog's.
CREATE OR REPLACE FUNCTION cdc_invalidator.held_enums_v1(rels oid[])
RETURNS TABLE (enum_type oid)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $held_enums$
    WITH RECURSIVE tables (rel) AS (
        SELECT unnest(rels)
        UNION
        SELECT i.inhrelid FROM tables t JOIN pg_inherits i ON i.inhparent = t.rel
    ), types (typ) AS (
        -- (by the index: a hash join of all of pg_attribute was most of the cost)
        SELECT a.atttypid FROM pg_attribute a
        WHERE a.attrelid = ANY (ARRAY(SELECT t.rel FROM tables t))
          AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT h.typ FROM types ty CROSS JOIN LATERAL (
            SELECT t.typelem FROM pg_type t
            WHERE t.oid = ty.typ AND t.typcategory = 'A' AND t.typelem <> 0
            UNION ALL
            SELECT t.typbasetype FROM pg_type t WHERE t.oid = ty.typ AND t.typtype = 'd'
            UNION ALL
            SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.typ
            UNION ALL
            SELECT r.rngtypid FROM pg_range r WHERE (to_jsonb(r) ->> 'rngmultitypid')::oid = ty.typ
            UNION ALL
            SELECT a.atttypid FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid
            WHERE t.oid = ty.typ AND t.typrelid <> 0 AND a.attnum > 0 AND NOT a.attisdropped
        ) h (typ)
    )
    SELECT ty.typ FROM types ty WHERE (SELECT t.typtype FROM pg_type t WHERE t.oid = ty.typ) = 'e'
$held_enums$;
REVOKE ALL ON FUNCTION cdc_invalidator.held_enums_v1(oid[]) FROM PUBLIC;

-- enum_renamed_v1 (at ddl_command_start and at ddl_command_end of ALTER TYPE): ALTER
-- TYPE ... RENAME VALUE changes how every row holding the value reads, with no row
-- change a trigger sees or decoding sends (measured: the rows an app cached kept the old
-- label, and `user:st:active` stayed, in both modes). Which ALTER TYPE it was is not
-- told to an event trigger, so the labels of the enums the watched tables' columns may
-- hold (held_enums_v1()) are kept at the command's start, by transaction, and compared
-- at its end: a label whose oid names another now was renamed (ADD VALUE only adds one).
-- Each watched table whose columns may hold such an enum asks for one sweep of its
-- templates, in the command's transaction. (Keeping every label of the database made
-- each ALTER TYPE, OWNER TO too, cost 100 ms at 10,000 labels, a review's: a
-- statement_timeout cancels it, which no handler catches, and the DDL failed.) The rows
-- live from the command's start to its end (a command that fails takes them with it);
-- only the role that installed (the event triggers') writes them.
CREATE TABLE IF NOT EXISTS cdc_invalidator.enum_labels_v1 (
    xid   xid8 NOT NULL,
    label oid NOT NULL,
    name  name NOT NULL,
    PRIMARY KEY (xid, label)
);
REVOKE ALL ON TABLE cdc_invalidator.enum_labels_v1 FROM PUBLIC;
DELETE FROM cdc_invalidator.enum_labels_v1;

CREATE OR REPLACE FUNCTION cdc_invalidator.enum_renamed_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $enum_renamed$
DECLARE
    renamed oid[];
    tbl     oid;
BEGIN
    -- Never a failed migration: whatever goes wrong here is a WARNING.
    BEGIN
        IF TG_EVENT = 'ddl_command_start' THEN
            DELETE FROM cdc_invalidator.enum_labels_v1 WHERE xid = pg_current_xact_id();
            INSERT INTO cdc_invalidator.enum_labels_v1 (xid, label, name)
            SELECT pg_current_xact_id(), e.oid, e.enumlabel FROM pg_enum e
            WHERE e.enumtypid IN (SELECT h.enum_type FROM cdc_invalidator.held_enums_v1(
                                      ARRAY(SELECT DISTINCT x.root FROM cdc_invalidator.roots_v1() x)) h);
            RETURN;
        END IF;
        WITH kept AS (
            DELETE FROM cdc_invalidator.enum_labels_v1 k WHERE k.xid = pg_current_xact_id()
            RETURNING k.label, k.name)
        SELECT array_agg(DISTINCT e.enumtypid) INTO renamed
        FROM kept JOIN pg_enum e ON e.oid = kept.label
        WHERE e.enumlabel <> kept.name;
        IF renamed IS NULL THEN
            RETURN;
        END IF;
        FOR tbl IN
            SELECT DISTINCT x.root FROM cdc_invalidator.roots_v1() x
            WHERE EXISTS (SELECT FROM cdc_invalidator.held_enums_v1(ARRAY[x.root]) h
                          WHERE h.enum_type = ANY (renamed))
        LOOP
            PERFORM cdc_invalidator.sweep_root_v1(tbl, format(
                'a value of enum type %s was renamed (ALTER TYPE ... RENAME VALUE): the rows '
                'of table %s that hold it read otherwise, with no row change seen',
                array_to_string(renamed::regtype[], ', '), tbl::regclass));
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'cdc_invalidator: the rebuild guard failed (%): an enum value renamed '
            'by this command leaves the rows that hold it cached: sweep their tables'' keys',
            SQLERRM;
    END;
END
$enum_renamed$;
REVOKE ALL ON FUNCTION cdc_invalidator.enum_renamed_v1() FROM PUBLIC;

-- Install's own record of the partitions (it ran watch() and the publication first).
SELECT cdc_invalidator.sync_members_v1(NULL, false);

REVOKE ALL ON FUNCTION cdc_invalidator.rebuilt_v1() FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.dropped_v1() FROM PUBLIC;

-- Event triggers are for superusers only: installed by another role, there is no guard;
-- `check` says so. They go with uninstall (uninstall.sql), not with a switch of modes.
-- ALWAYS: a migration run with session_replication_role = replica (as some loaders and
-- restore tools set it) is guarded too, as its writes are captured.
DO $rebuild_guard$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        -- Made again where an earlier release made them for fewer commands.
        IF EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_rebuilt'
                     AND evttags IS DISTINCT FROM ARRAY['CREATE TABLE', 'CREATE TABLE AS',
                         'SELECT INTO', 'ALTER TABLE', 'ALTER INDEX', 'ALTER SCHEMA',
                         'CREATE SCHEMA']) THEN
            DROP EVENT TRIGGER cdc_invalidator_rebuilt;
        END IF;
        IF EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_parts_moved'
                     AND evttags IS DISTINCT FROM ARRAY['CREATE TABLE', 'CREATE FOREIGN TABLE',
                         'ALTER TABLE', 'CREATE SCHEMA', 'ALTER SCHEMA', 'ALTER INDEX']) THEN
            DROP EVENT TRIGGER cdc_invalidator_parts_moved;
        END IF;
        -- (CREATE SCHEMA ... CREATE TABLE: a table made inside a schema's command)
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_rebuilt') THEN
            CREATE EVENT TRIGGER cdc_invalidator_rebuilt ON ddl_command_end
                WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE',
                             'ALTER INDEX', 'ALTER SCHEMA', 'CREATE SCHEMA')
                EXECUTE FUNCTION cdc_invalidator.rebuilt_v1();
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_dropped') THEN
            CREATE EVENT TRIGGER cdc_invalidator_dropped ON sql_drop
                WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
                EXECUTE FUNCTION cdc_invalidator.dropped_v1();
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_parts_moved') THEN
            CREATE EVENT TRIGGER cdc_invalidator_parts_moved ON ddl_command_end
                WHEN TAG IN ('CREATE TABLE', 'CREATE FOREIGN TABLE', 'ALTER TABLE',
                             'CREATE SCHEMA', 'ALTER SCHEMA', 'ALTER INDEX')
                EXECUTE FUNCTION cdc_invalidator.parts_moved_v1();
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_rewritten') THEN
            CREATE EVENT TRIGGER cdc_invalidator_rewritten ON table_rewrite
                EXECUTE FUNCTION cdc_invalidator.rewritten_v1();
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_rewritten') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_rewritten ENABLE ALWAYS;
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_enum_labels') THEN
            CREATE EVENT TRIGGER cdc_invalidator_enum_labels ON ddl_command_start
                WHEN TAG IN ('ALTER TYPE')
                EXECUTE FUNCTION cdc_invalidator.enum_renamed_v1();
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_enum_renamed') THEN
            CREATE EVENT TRIGGER cdc_invalidator_enum_renamed ON ddl_command_end
                WHEN TAG IN ('ALTER TYPE')
                EXECUTE FUNCTION cdc_invalidator.enum_renamed_v1();
        END IF;
        -- (every command: a DROP ... CASCADE of many kinds of object can take a table)
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_parts_dropped') THEN
            CREATE EVENT TRIGGER cdc_invalidator_parts_dropped ON sql_drop
                EXECUTE FUNCTION cdc_invalidator.parts_dropped_v1();
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_rebuilt') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_rebuilt ENABLE ALWAYS;
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_dropped') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_dropped ENABLE ALWAYS;
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_parts_moved') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_parts_moved ENABLE ALWAYS;
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_parts_dropped') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_parts_dropped ENABLE ALWAYS;
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_enum_labels') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_enum_labels ENABLE ALWAYS;
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_enum_renamed') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_enum_renamed ENABLE ALWAYS;
        END IF;
    END IF;
END
$rebuild_guard$;
