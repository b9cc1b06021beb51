-- cdc-invalidator: trigger-queue capture, schema version 1.
--
-- What this creates, all inside the schema "cdc_invalidator":
--   queue_v1            one row per changed row of a watched table (one per TRUNCATE),
--                       stamped with the writer's transaction id.
--   dead_letter_v1      events the listener could not turn into keys, with the error.
--   listener_state_v1   how far the listener got: a snapshot whose visible transactions
--                       have all been invalidated, and when it last got further.
--   redis_identity_v1   the Redis server the listener last wrote to (replay on a change).
--   watched_v1          which tables carry our triggers and which columns they copy.
--   watch(), unwatch()  the API a DBA can also call by hand.
-- Every object name carries a version suffix (_v1) so that a later release can install
-- its own objects beside these and migrate. Running this file again changes nothing.
-- Nothing here talks to Redis: deleting from inside the writer's transaction would let
-- a reader refill the cache from the not-yet-committed old row.

CREATE SCHEMA IF NOT EXISTS cdc_invalidator;
COMMENT ON SCHEMA cdc_invalidator IS
    'cdc-invalidator: queue of row changes whose Redis keys must be deleted';

-- The queue. Rows hold only the key columns that the key templates use, rendered as
-- PostgreSQL text (what ::text gives), never whole rows: that keeps TOASTed columns and
-- size limits out of the write path.
--
-- The listener reads it without locking or deleting rows. It takes the rows of the
-- transactions that became visible between two snapshots (the one it finished last,
-- the one it takes now): every committed transaction becomes visible in exactly one
-- such step, however its id and its commit are ordered against others, so nothing is
-- skipped and nothing waits for unrelated long transactions. Rows are deleted later in
-- bulk, once they lie below the finished snapshot.
CREATE TABLE IF NOT EXISTS cdc_invalidator.queue_v1 (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    op          text NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    -- json, not jsonb: stored and read back as the text the trigger built, with no
    -- conversion either way (the listener parses it).
    old_row     json,  -- key columns before the change (UPDATE, DELETE)
    new_row     json   -- key columns after the change (INSERT, UPDATE)
) WITH (
    -- Rows are inserted once and deleted in bulk: vacuum soon after each bulk delete.
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000
);
-- The only index, so writers maintain one: the listener's reads and the bulk deletes
-- are ranges of (xid, id).
CREATE INDEX IF NOT EXISTS queue_v1_xid_id ON cdc_invalidator.queue_v1 (xid, id);

-- Events that could not be rendered into keys (table no longer configured, a column
-- missing from the payload, a value that cannot render). Columns are nullable on
-- purpose: parking a broken event must never fail and block the queue.
CREATE TABLE IF NOT EXISTS cdc_invalidator.dead_letter_v1 (
    id          bigint PRIMARY KEY,  -- the id the event had in queue_v1
    enqueued_at timestamptz,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    schema_name text,
    table_name  text,
    op          text,
    old_row     json,
    new_row     json,
    error       text NOT NULL
);

CREATE TABLE IF NOT EXISTS cdc_invalidator.listener_state_v1 (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Every transaction visible in this snapshot has had its keys deleted. '1:1:' sees
    -- no transaction at all: a fresh install starts from the first queued row.
    snapshot          pg_snapshot NOT NULL DEFAULT '1:1:',
    -- A larger window is read in chunks: its end snapshot and the last (xid, id) done.
    window_end        pg_snapshot,
    after_xid         xid8,
    after_id          bigint,
    last_processed_at timestamptz,
    events_processed  bigint NOT NULL DEFAULT 0
);
INSERT INTO cdc_invalidator.listener_state_v1 (singleton) VALUES (true)
ON CONFLICT (singleton) DO NOTHING;

-- The Redis the listener last wrote to, as INFO names it (run_id, master_replid). A
-- different one (restarted from a snapshot, failed over) may hold keys the listener
-- deleted before: those invalidated within the replay window are deleted again, and
-- then the new identity is saved. Kept here so that a listener restarted along with
-- Redis still notices.
CREATE TABLE IF NOT EXISTS cdc_invalidator.redis_identity_v1 (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    identity  text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS cdc_invalidator.watched_v1 (
    relid      regclass PRIMARY KEY,
    columns    text[] NOT NULL,
    watched_at timestamptz NOT NULL DEFAULT now()
);

-- `cdc-invalidator check` compares this with the version the listener expects.
CREATE OR REPLACE FUNCTION cdc_invalidator.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 1';

-- watch(table, columns): capture every committed change of `table`, copying `columns`.
-- It (re)generates one trigger function for the table, with the column list compiled
-- in (no dynamic SQL per row), and attaches four statement-level triggers. INSERT,
-- UPDATE and DELETE read transition tables, so a statement that touches 100k rows runs
-- one INSERT ... SELECT into the queue instead of 100k trigger calls. TRUNCATE fires
-- no row triggers at all: its own trigger queues one event for the whole table.
-- Calling it again with other columns replaces the function; the triggers stay.
-- SECURITY DEFINER (owner: the installing role) so that writers need no privilege on
-- the queue; the pinned search_path and format('%I'/'%L') keep table and column names
-- from ever running as SQL.
CREATE OR REPLACE FUNCTION cdc_invalidator.watch(tbl regclass, key_columns text[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $watch$
DECLARE
    fn       text := format('cdc_invalidator.%I', 'capture_' || tbl::oid || '_v1');
    missing  text;
    row_json text;
    kind     "char";
    names    text;
    body     text;
    rel      regclass;
    trg      record;
BEGIN
    SELECT relkind INTO kind FROM pg_class WHERE oid = tbl;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: % is not a table', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    key_columns := ARRAY(SELECT DISTINCT c FROM unnest(coalesce(key_columns, '{}')) c ORDER BY c);
    SELECT string_agg(quote_ident(c), ', ') INTO missing
    FROM unnest(key_columns) c
    WHERE NOT EXISTS (
        SELECT FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: table % has no column %', tbl, missing
            USING ERRCODE = 'undefined_column';
    END IF;

    -- json_build_object('id', r.id::text, 'email', r.email::text)
    SELECT 'json_build_object(' || coalesce(string_agg(format('%L, r.%I::text', c, c), ', '), '') || ')'
    INTO row_json FROM unnest(key_columns) c;
    -- The watched table's own schema and name, compiled in: a write that names one of
    -- its partitions is still a change of the table the configuration knows.
    SELECT format('%L, %L', n.nspname, c.relname) INTO names
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;

    body := format($body$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row)
                SELECT %1$s, 'I', %2$s FROM new_rows r;
            ELSIF TG_OP = 'UPDATE' THEN
                -- Old and new rows are paired by position. Were the pairing ever off,
                -- the statement's events would still name every old and new key.
                INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, new_row)
                SELECT %1$s, 'U', o.j, n.j
                FROM (SELECT row_number() OVER () AS rn, %2$s AS j FROM old_rows r) o
                JOIN (SELECT row_number() OVER () AS rn, %2$s AS j FROM new_rows r) n USING (rn);
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row)
                SELECT %1$s, 'D', %2$s FROM old_rows r;
            ELSE
                INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op)
                VALUES (%1$s, 'T');
            END IF;
            -- A wake-up only: the queue row is the record. Identical notifications
            -- in one transaction fold into one, delivered at commit.
            IF FOUND THEN
                PERFORM pg_notify('cdc_invalidator_v1', '');
            END IF;
            RETURN NULL;
        END
    $body$, names, row_json);

    -- The body goes in as a quoted literal (%L): no table or column name can end it
    -- early. The settings that change how values print as text are pinned, so that a
    -- key renders the same whichever session wrote the row (timestamps in UTC, ISO).
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
        'SET search_path = pg_catalog, pg_temp SET "TimeZone" = %L SET "DateStyle" = %L '
        'SET "IntervalStyle" = %L SET extra_float_digits = 1 AS %L',
        fn, 'UTC', 'ISO, MDY', 'postgres', body);
    EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', fn);

    -- The table, and for a partitioned table every partition too: statement triggers
    -- fire only on the table a statement names. Only missing triggers are created, so
    -- re-running watch() takes no table lock beyond what replacing the function needs.
    -- (pg_partition_tree lists nothing for a table that is not partitioned.)
    FOR rel IN SELECT tbl UNION SELECT p.relid FROM pg_partition_tree(tbl) p LOOP
        FOR trg IN
            SELECT * FROM (VALUES
                ('cdc_invalidator_ins_v1', 'INSERT', 'REFERENCING NEW TABLE AS new_rows'),
                ('cdc_invalidator_upd_v1', 'UPDATE',
                 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'),
                ('cdc_invalidator_del_v1', 'DELETE', 'REFERENCING OLD TABLE AS old_rows'),
                ('cdc_invalidator_trunc_v1', 'TRUNCATE', '')
            ) AS t (name, event, referencing)
        LOOP
            IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = rel AND tgname = trg.name) THEN
                EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                               trg.name, trg.event, rel, trg.referencing, fn);
            END IF;
        END LOOP;
    END LOOP;

    INSERT INTO cdc_invalidator.watched_v1 (relid, columns) VALUES (tbl, key_columns)
    ON CONFLICT (relid) DO UPDATE SET columns = EXCLUDED.columns, watched_at = now();
END
$watch$;

-- unwatch(table): remove our triggers (on its partitions too) and the table's trigger
-- function. Events already queued stay and are still processed.
CREATE OR REPLACE FUNCTION cdc_invalidator.unwatch(tbl regclass)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $unwatch$
DECLARE
    t   record;
    fns regprocedure[] := '{}';
    fn  regprocedure;
BEGIN
    FOR t IN
        SELECT tg.tgname, tg.tgrelid::regclass AS rel, p.oid::regprocedure AS fn
        FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE (tg.tgrelid = tbl OR tg.tgrelid IN (SELECT pt.relid FROM pg_partition_tree(tbl) pt))
          AND tg.tgname LIKE 'cdc\_invalidator\_%\_v1'
          AND p.pronamespace = 'cdc_invalidator'::regnamespace
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
        fns := fns || t.fn;
    END LOOP;
    -- The triggers share one function: drop it once none of them is left. A table that
    -- was dropped took its triggers along; its function is found by name.
    fns := fns || to_regprocedure(format('cdc_invalidator.%I()', 'capture_' || tbl::oid || '_v1'));
    FOREACH fn IN ARRAY ARRAY(SELECT DISTINCT f FROM unnest(fns) f WHERE f IS NOT NULL) LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS %s', fn);
    END LOOP;
    DELETE FROM cdc_invalidator.watched_v1 WHERE relid = tbl;
END
$unwatch$;

-- Changing triggers runs with the installer's rights: nobody else may call these.
REVOKE ALL ON FUNCTION cdc_invalidator.watch(regclass, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.unwatch(regclass) FROM PUBLIC;
