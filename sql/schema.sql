-- cdc-invalidator: trigger-queue capture, schema version 1.
--
-- What this creates, all inside the schema "cdc_invalidator":
--   queue_v1            one row per changed row of a watched table (one per TRUNCATE),
--                       or per pack of a statement that changed several (all of them up
--                       to one_pack_rows_v1(), else pack_rows_v1() each), stamped with
--                       the writer's transaction id.
--   dead_letter_v1      events the listener could not turn into keys, with the error.
--   listener_state_v1   how far the listener got: a snapshot whose visible transactions
--                       have all been invalidated, and when it last got further.
--   progress_v1         each saved snapshot with the time it was saved, for replay.
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

-- Install's mark: our event triggers (logical mode's DDL guard, the rebuild guard) stand
-- aside while install does their work itself. The session setting installing.sql sets
-- can be set by any role, even from a function a migration runs: alone it would let a
-- table's owner switch the guards off for its own DDL. So a transaction is installing
-- only if it also wrote its id here, which only the installing role can (the guards
-- run as that role). install_done.sql takes the row away in the same transaction: no
-- one ever sees it. A row another transaction left (the printed script run by psql
-- without --single-transaction commits each statement, and one stopped half-way leaves
-- its mark) counts for nothing, even restored into a cluster whose counter reaches that
-- id again: the row must be this transaction's own (its xmin); the next install deletes it.
CREATE TABLE IF NOT EXISTS cdc_invalidator.install_marks_v1 (
    xid xid8 PRIMARY KEY
);
REVOKE ALL ON TABLE cdc_invalidator.install_marks_v1 FROM PUBLIC;
DELETE FROM cdc_invalidator.install_marks_v1 WHERE xid <> pg_current_xact_id();

-- installing_v1(): whether this transaction is install's (or the rebuild guard's own
-- publishing, which marks itself the same way).
CREATE OR REPLACE FUNCTION cdc_invalidator.installing_v1()
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $installing$
    SELECT coalesce(current_setting('cdc_invalidator.installing', true), '') = 'on'
       AND EXISTS (SELECT FROM cdc_invalidator.install_marks_v1 m
                   WHERE m.xid = pg_current_xact_id_if_assigned()
                     -- (written by this transaction, or a subtransaction of it, whose
                     -- ids come after: not a row from before it that claims its id)
                     AND age(m.xmin) <= 0)
$installing$;
REVOKE ALL ON FUNCTION cdc_invalidator.installing_v1() FROM PUBLIC;

-- mark_install_v1() / unmark_install_v1(was, marked): our own DDL, made by an event trigger
-- of ours (the rebuild guard's triggers and publishing), marked as install's so that our
-- event triggers, fired again by it, stand aside. mark returns whether it wrote the mark
-- (inside install, install's is there already); unmark puts the setting back to `was`
-- and takes away only a mark of its own.
CREATE OR REPLACE FUNCTION cdc_invalidator.mark_install_v1()
RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $mark$
DECLARE
    marked boolean;
BEGIN
    PERFORM set_config('cdc_invalidator.installing', 'on', true);
    INSERT INTO cdc_invalidator.install_marks_v1 VALUES (pg_current_xact_id())
    ON CONFLICT DO NOTHING RETURNING true INTO marked;
    RETURN coalesce(marked, false);
END
$mark$;
REVOKE ALL ON FUNCTION cdc_invalidator.mark_install_v1() FROM PUBLIC;

CREATE OR REPLACE FUNCTION cdc_invalidator.unmark_install_v1(was text, marked boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $unmark$
BEGIN
    PERFORM set_config('cdc_invalidator.installing', was, true);
    IF marked THEN
        DELETE FROM cdc_invalidator.install_marks_v1 WHERE xid = pg_current_xact_id();
    END IF;
END
$unmark$;
REVOKE ALL ON FUNCTION cdc_invalidator.unmark_install_v1(text, boolean) FROM PUBLIC;
SELECT cdc_invalidator.mark_install_v1();  -- install's own mark

-- partitions_v1(root): every partition under the partitioned table `root`, at any depth
-- (all of its descendants are partitions: PostgreSQL allows no inheritance children in a
-- partition tree). Read from pg_inherits, which locks nothing; a partition whose detach
-- is pending still counts, until FINALIZE. (pg_partition_tree() takes a lock on every
-- partition, which the DDL guards' callers hold to the end of their transaction: DDL on
-- one partition waited on, and deadlocked with, DDL on another.)
CREATE OR REPLACE FUNCTION cdc_invalidator.partitions_v1(root oid)
RETURNS oid[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $partitions$
    WITH RECURSIVE tree(rel) AS (
        SELECT i.inhrelid FROM pg_inherits i WHERE i.inhparent = root
        UNION ALL
        SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.rel)
    SELECT coalesce(array_agg(tree.rel ORDER BY tree.rel), '{}') FROM tree
$partitions$;
REVOKE ALL ON FUNCTION cdc_invalidator.partitions_v1(oid) FROM PUBLIC;

-- heirs_v1(root, skip): the inheritance children of the plain table `root` (CREATE TABLE
-- ... INHERITS, ALTER TABLE ... INHERIT), at any depth, but not those in `skip` (tables
-- configured on their own) nor theirs. A statement naming `root` reads and writes their
-- rows too; one naming a child fires only the child's statement triggers, and logical
-- decoding reports the child's changes as the child's relation: they are captured under
-- `root`'s name, as partitions are. (A partitioned table has no inheritance children, a
-- plain table no partitions.) From pg_inherits, which locks nothing.
CREATE OR REPLACE FUNCTION cdc_invalidator.heirs_v1(root oid, skip oid[] DEFAULT '{}')
RETURNS oid[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $heirs$
    WITH RECURSIVE tree(rel) AS (
        SELECT i.inhrelid FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
        WHERE i.inhparent = root AND c.relkind = 'r' AND i.inhrelid <> ALL (skip)
        UNION
        SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.rel
        WHERE i.inhrelid <> ALL (skip))
    -- Not a temporary child (another session's cannot be altered, nor its rows reached
    -- by any other session), nor a foreign one (it can have no trigger with transition
    -- tables, and its rows are written on its server; check names it).
    SELECT coalesce(array_agg(tree.rel ORDER BY tree.rel), '{}')
    FROM tree JOIN pg_class c ON c.oid = tree.rel
    WHERE c.relkind = 'r' AND c.relpersistence <> 't'
$heirs$;

-- ancestors_v1(rel): the tables `rel` is a partition or an inheritance child of, at any
-- depth (pg_partition_ancestors() knows no inheritance). From pg_inherits.
CREATE OR REPLACE FUNCTION cdc_invalidator.ancestors_v1(rel oid)
RETURNS oid[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $ancestors$
    WITH RECURSIVE up(rel) AS (
        SELECT i.inhparent FROM pg_inherits i WHERE i.inhrelid = ancestors_v1.rel
        UNION
        SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.rel)
    SELECT coalesce(array_agg(up.rel), '{}') FROM up
$ancestors$;
REVOKE ALL ON FUNCTION cdc_invalidator.ancestors_v1(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.heirs_v1(oid, oid[]) FROM PUBLIC;

-- add_column_v1(table, column, type): install's ADD COLUMN of a column a later release
-- added, run only where the table lacks it, looked up in the catalog first: ADD COLUMN
-- IF NOT EXISTS takes ACCESS EXCLUSIVE on the table before it looks, and install is one
-- transaction, so every run would hold every reader and writer of the table (for the
-- queue: every write to a watched table) until it commits.
CREATE OR REPLACE FUNCTION cdc_invalidator.add_column_v1(tbl regclass, col name, type text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $add_column$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute
                   WHERE attrelid = tbl AND attname = col AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', tbl, col, type);
    END IF;
END
$add_column$;
REVOKE ALL ON FUNCTION cdc_invalidator.add_column_v1(regclass, name, text) FROM PUBLIC;

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
-- are ranges of (xid, id). Created where the catalog lacks it: CREATE INDEX IF NOT
-- EXISTS takes SHARE on the table before it looks, and install is one transaction: every
-- run would hold every write to a watched table (each queues a row here) until it
-- commits, and wait itself behind any transaction that writes one.
DO $queue_index$
BEGIN
    IF to_regclass('cdc_invalidator.queue_v1_xid_id') IS NULL THEN
        CREATE INDEX queue_v1_xid_id ON cdc_invalidator.queue_v1 (xid, id);
    END IF;
END
$queue_index$;
-- A pack: the changes of several rows of one statement in one queue row (all of them up
-- to one_pack_rows_v1() rows, else pack_rows_v1() rows each), its key columns
-- column-wise ({"id": ["1", "2", ...]}; an UPDATE's old and new arrays paired by
-- index), `rows` saying how many. NULL: one change, as above. A statement of
-- a million rows then writes a thousand queue rows instead of a million (the writer's
-- cost: docs/DBA.md, "What a bulk statement costs"). Added to existing installs: NULL
-- in every row already queued, which is what they are.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.queue_v1', 'rows', 'integer');
-- The writer's backend (pg_backend_pid()), for a row whose change also went out in a
-- NOTIFY payload (queue_early_v1): the listener skips deleting such a row's keys again
-- only if the payload it deleted them from came from that backend (capture/early.py).
-- NULL for every other row, and where the session sent no NOTIFY (cdc_invalidator.notify
-- = 'off', which two-phase commit needs): a prepared transaction leaves its backend,
-- whose pid may then send anything, or be another's.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.queue_v1', 'pid', 'integer');
-- A pack's JSON (a thousand rows' key columns, tens of kB) is compressed as it is stored,
-- by the writer's own session inside its statement: lz4 where the server was built with
-- it, else PostgreSQL's default, pglz, which cost a 1M-row statement's writer 12-16 % more
-- time (DELETE 1.33 against 1.15 s, UPDATE 3.99 against 3.51 s) and its reader more to
-- decompress. One-row changes are too small to be compressed either way. Rows already
-- queued keep theirs.
DO $queue_lz4$
BEGIN
    IF EXISTS (
        SELECT FROM pg_settings
        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
    ) AND EXISTS (  -- (already both: no lock taken again)
        SELECT FROM pg_attribute
        WHERE attrelid = 'cdc_invalidator.queue_v1'::regclass
          AND attname IN ('old_row', 'new_row') AND attcompression <> 'l'
    ) THEN
        ALTER TABLE cdc_invalidator.queue_v1
            ALTER COLUMN old_row SET COMPRESSION lz4,
            ALTER COLUMN new_row SET COMPRESSION lz4;
    END IF;
END
$queue_lz4$;

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
-- A pack's dead letter is the whole pack, copied verbatim (one row per queue row, so its
-- id stays the queue id); its error names each element that failed (element 0 is the
-- first), and the pack's other elements were invalidated.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.dead_letter_v1', 'rows', 'integer');

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
-- The server the listener last ran on, or install before its first start (revision 6:
-- server_lineage_v1() and note_server_v1(), now note_server_v3(), below).
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.listener_state_v1', 'server_lineage', 'text');
-- server_lineage_v1(): this server's system identifier and the timeline it writes WAL
-- on. A standby promoted (a failover, a switchover) writes on a new timeline, and so
-- does a cluster brought back to a point in time; another cluster (a dump restored into
-- it, pg_upgrade, a copy by logical replication) has another system identifier. The
-- timeline is that of the WAL file being written (the first 8 hex digits of its name):
-- pg_control_checkpoint() names the new one only after the first checkpoint after a
-- promotion, which is spread out. NULL where the server withholds them (a managed
-- service without WAL files of its own): nothing to compare, which the listener says.
CREATE OR REPLACE FUNCTION cdc_invalidator.server_lineage_v1() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $lineage$
BEGIN
    RETURN (SELECT system_identifier FROM pg_control_system())::text || ' timeline '
           || ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int;
EXCEPTION WHEN OTHERS THEN
    -- (whatever a managed service answers instead: the listener starts all the same)
    RETURN NULL;
END
$lineage$;
-- Recorded by install where no listener has yet (a first install, an upgrade): so that a
-- standby promoted before the listener's first start has this in its copy, and the
-- listener sees the change. Never over a listener's: install may run on a promoted
-- standby before the listener, which must still see that.
UPDATE cdc_invalidator.listener_state_v1
SET server_lineage = cdc_invalidator.server_lineage_v1()
WHERE server_lineage IS NULL;
-- The run of the server the listener last noted (revision 7: server_run_v1() below,
-- compared by note_server_v3()), recorded by install as the lineage is.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.listener_state_v1', 'server_run', 'text');
-- This server's run, kept while it does not crash (revision 7): an unlogged table, which
-- crash recovery empties (of PostgreSQL, or of any one backend: the postmaster then
-- ends every session and recovers without restarting), as it empties every unlogged
-- table, and a clean shutdown keeps. Such a crash loses the WAL not yet flushed: the
-- commits made with synchronous_commit = off that readers may already have seen and
-- cached. (A base backup leaves unlogged tables out, and a standby does not replicate
-- them: a backup restored, or a standby promoted, starts empty too; the lineage tells
-- the latter.) Statistics are no such mark: pg_stat_reset_shared() resets them too.
CREATE UNLOGGED TABLE IF NOT EXISTS cdc_invalidator.server_run_v1 (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    run       text NOT NULL  -- when it was first asked for: an epoch's text
);
-- server_run_v1(): this run's mark, made where there is none (an epoch's text, when it was
-- first asked for since the server's first start or its last crash), as its owner. NULL
-- on a standby, which may not read unlogged tables. Not executable by PUBLIC (granted
-- to listener roles by grant_listener): a caller that held its transaction open after
-- making the mark would hold every other caller's insert, the listener's connect with
-- it; lock_timeout bounds that wait (the listener retries).
CREATE OR REPLACE FUNCTION cdc_invalidator.server_run_v1() RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '10s'
AS $run$
DECLARE
    mark text;
BEGIN
    IF pg_is_in_recovery() THEN
        RETURN NULL;
    END IF;
    SELECT r.run INTO mark FROM cdc_invalidator.server_run_v1 r;
    IF mark IS NULL THEN
        -- (two sessions at once: the second waits for the first, and reads its mark)
        INSERT INTO cdc_invalidator.server_run_v1 (run)
        VALUES (extract(epoch FROM clock_timestamp())::text)
        ON CONFLICT (singleton) DO NOTHING;
        SELECT r.run INTO mark FROM cdc_invalidator.server_run_v1 r;
    END IF;
    RETURN mark;
END
$run$;
REVOKE ALL ON FUNCTION cdc_invalidator.server_run_v1() FROM PUBLIC;
UPDATE cdc_invalidator.listener_state_v1
SET server_run = cdc_invalidator.server_run_v1()
WHERE server_run IS NULL;
-- The table this row was recorded in (revision 8): listener_state_v1's oid, when install
-- or the listener last wrote it. A dump restored (into another database of this cluster,
-- over this one, or into another cluster) makes the table anew, with another oid, and
-- copies the row into it: the database went back to the dump's time, and the keys of
-- what it lost stay cached (note_server_v3() compares). A copy of the data directory
-- (a standby, a base backup, pg_upgrade) keeps the oid. Recorded by install where none
-- is (a first install, an upgrade), never over one: install run on a restored database
-- before the listener must leave that for the listener to see.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.listener_state_v1', 'recorded_in', 'oid');
UPDATE cdc_invalidator.listener_state_v1
SET recorded_in = 'cdc_invalidator.listener_state_v1'::regclass
WHERE recorded_in IS NULL;
-- This database's oid. A copy made by CREATE DATABASE ... TEMPLATE (a snapshot taken
-- before a risky change, later renamed into place, or copied over a database dropped)
-- keeps every table's oid, and its rows too, but is another database, with another oid.
-- A catalog lookup, so PUBLIC may call it (the logical listener does: slot_info.sql).
CREATE OR REPLACE FUNCTION cdc_invalidator.database_oid_v1() RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS 'SELECT oid FROM pg_database WHERE datname = current_database()';
-- The database this row was recorded in (revision 9), beside the table: a row recorded
-- in another database came with a copy of it, which took this one back to the copy's
-- time, as a dump's restore does (note_server_v3() compares). Recorded by install where
-- none is, as recorded_in is.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.listener_state_v1', 'recorded_in_database', 'oid');
UPDATE cdc_invalidator.listener_state_v1
SET recorded_in_database = cdc_invalidator.database_oid_v1()
WHERE recorded_in_database IS NULL;

-- When the listener's progress got where: each save of listener_state_v1 also records
-- its snapshot here, with the time of the save (save_progress.sql). Every transaction
-- visible in a row's snapshot had its keys deleted by `at`. Replay reads it to find the
-- queue rows whose keys were deleted since a time (history_trigger.sql): the rows not
-- visible in the newest snapshot saved by then, however long ago they were written. At
-- most one row per save (ten a second), pruned with the queue after replay_history,
-- keeping the newest row older than that (prune.sql).
CREATE TABLE IF NOT EXISTS cdc_invalidator.progress_v1 (
    at       timestamptz NOT NULL DEFAULT now(),
    snapshot pg_snapshot NOT NULL
);
-- Replay looks up the newest row at or before a time, pruning deletes the oldest.
DO $progress_index$
BEGIN
    IF to_regclass('cdc_invalidator.progress_v1_at') IS NULL THEN  -- (as the queue's)
        CREATE INDEX progress_v1_at ON cdc_invalidator.progress_v1 (at);
    END IF;
END
$progress_index$;
-- Installed over a release without it (revision 2 or older): the position that release
-- saved, and when, is such a row already (last_processed_at is set with each save).
-- Without it every replay would take every row kept, until replay_history has passed:
-- the listener's start, which replays the last seconds' second deletes, too.
INSERT INTO cdc_invalidator.progress_v1 (at, snapshot)
SELECT last_processed_at, snapshot FROM cdc_invalidator.listener_state_v1
WHERE last_processed_at IS NOT NULL
  AND NOT EXISTS (SELECT FROM cdc_invalidator.progress_v1);

-- A publication FOR ALL TABLES (Debezium's default, for one) takes our tables too, and
-- one that publishes deletes (updates) makes every DELETE (UPDATE) of a table without a
-- replica identity fail: the listener's pruning of the queue and of progress_v1, which have no
-- primary key (the queue's one index is what its writers maintain). Where such a
-- publication exists they get REPLICA IDENTITY FULL: wal_level = logical then logs a
-- pruned row whole once more; the writers pay nothing (an INSERT logs no old row).
-- Looked up first: the ALTER locks the queue (check reports a publication made later).
DO $all_tables$
DECLARE
    tbl regclass;
BEGIN
    IF EXISTS (SELECT FROM pg_publication WHERE puballtables AND (pubdelete OR pubupdate)) THEN
        FOREACH tbl IN ARRAY ARRAY['cdc_invalidator.queue_v1', 'cdc_invalidator.progress_v1']::regclass[] LOOP
            IF (SELECT relreplident FROM pg_class WHERE oid = tbl) <> 'f' THEN
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl);
            END IF;
        END LOOP;
    END IF;
END
$all_tables$;

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

-- Which tables carry our triggers: the columns their capture function copies (as the
-- configuration names them), where those columns were then (attnum: a rename keeps it, so
-- a renamed column is still found), and the name the events carry (the table's when
-- watched, which a later ALTER TABLE ... RENAME does not change; the names they carried
-- before are in renamed_from).
CREATE TABLE IF NOT EXISTS cdc_invalidator.watched_v1 (
    relid      regclass PRIMARY KEY,
    columns    text[] NOT NULL,
    watched_at timestamptz NOT NULL DEFAULT now()
);
-- Columns added by later releases:
--   attnums, schema_name, table_name: where the key columns were, the events' name;
--   judge, filter_columns: the table's column filter, as configured: 'ignore'
--     (ignore_columns) or 'columns' with its list; NULL: none, every UPDATE is queued;
--   judged: whether UPDATEs are judged row by row: false when the table has no primary
--     key to pair old and new rows by (then every UPDATE is queued);
--   judged_natts: ignore_columns: pg_class.relnatts when watched. A column added since
--     is judged by nobody: while it differs, every UPDATE is queued.
--   renamed_from: the names the table's events carried before (a JSON array of
--     [schema, table] pairs, oldest first), each recorded by the watch() that found the
--     table renamed since (ALTER TABLE ... RENAME TO / SET SCHEMA, ALTER SCHEMA ...
--     RENAME TO) and compiled its new name in. Rows queued under an old name (before that
--     install, or requeued dead letters) are still this table's: the listener maps them
--     by the table's name now (resolve_renamed.sql). NULL: never renamed.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.watched_v1', c.name, c.type)
FROM (VALUES ('attnums', 'int2[]'), ('schema_name', 'text'), ('table_name', 'text'),
             ('judge', 'text'), ('filter_columns', 'text[]'), ('judged', 'boolean'),
             ('judged_natts', 'int2'), ('renamed_from', 'jsonb')) AS c (name, type);

-- `cdc-invalidator check` compares this with the version the listener expects.
CREATE OR REPLACE FUNCTION cdc_invalidator.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 1';

-- The revision of version 1 this release installs: raised when `install` changes what
-- version 1's objects hold in place, so that a listener of another release refuses to
-- run instead of misreading rows (revision 2: packs, in queue_v1.rows; before it there
-- was no such function: revision 1; revision 3: progress_v1, which the listener writes
-- and replay reads; revision 4: queue_v1.pid, which the listener reads; revision 5:
-- mapping_v1, which the listener asks; revision 6: note_server_v1(), which it calls;
-- revision 7: note_server_v2(), which replaces it, and listener_state_v1.server_run
-- and slot_state_v1.server_run, which the listener compares with the server's;
-- revision 8: note_server_v3(), which replaces that, and listener_state_v1.recorded_in
-- and slot_state_v1.recorded_in, which the listener compares with the table's oid;
-- revision 9: their recorded_in_database, which it compares with database_oid_v1();
-- revision 10: slot_state_v1.server_lineage, which the logical listener reads and writes,
-- and mapping_v1.tables with retired_table_v1(), which the listener asks).
-- A constant, so PUBLIC may call it.
CREATE OR REPLACE FUNCTION cdc_invalidator.schema_revision() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 10';

-- The mappings installed, in order (revision 5): an install whose configuration's
-- tables mean something else than the last one's adds a row (record_mapping.sql). A
-- listener whose mapping was installed, then replaced by a later install, is behind
-- the database: it would render what the new capture queues with the old templates (a
-- template added on a column already copied fails nothing, and its keys stay cached),
-- as a standby still on the old file does when it takes over. It stops before it
-- acknowledges anything: mapping_state_v1(), asked at its start and in each save of
-- its position. A mapping never installed is ahead of install (the documented order
-- edits the file first, and install may come hours later), unless its file is older
-- than the last install: that listener runs.
CREATE TABLE IF NOT EXISTS cdc_invalidator.mapping_v1 (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fingerprint  text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
-- What each mapping's tables render (the configuration's tables by qualified name, each
-- {"keys": its templates with their key_prefix, "redis_db": its database or null}),
-- (revision 10): a change of a table an install stopped
-- watching, queued or streamed before that install committed, is rendered with the
-- templates of the last mapping that named it (retired_table_v1()). NULL in rows
-- recorded before it (record_mapping.sql fills in the last one).
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.mapping_v1', 'tables', 'jsonb');

-- retired_table_v1(qualified): the last installed mapping's entry for that table (as in
-- mapping_v1.tables), or NULL. The listener asks it for a table its configuration does
-- not name. As its owner: a listener role needs no grant on the table. It tells the
-- key templates of a table and no value; only the roles grant_listener() gave it to
-- may ask (sql/grants.sql), not PUBLIC. With "earlier": each other entry an earlier
-- mapping gave the table (other templates or redis_db), for the keys of a change
-- committed under it: a table removed, added again with other templates, removed
-- again, its changes queued or streamed meanwhile (the listener stopped) were all
-- rendered with the last ones, and the keys of those committed before the first
-- removal stayed cached (a:1 left, b:2 deleted). A listener of revision 10
-- before it reads "keys" and "redis_db" only.
CREATE OR REPLACE FUNCTION cdc_invalidator.retired_table_v1(qualified text)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $retired$
    WITH named AS (
        SELECT m.id, m.tables -> $1 AS entry FROM cdc_invalidator.mapping_v1 m
        WHERE m.tables ? $1
          -- Not from before a mapping that recorded no templates: one installed by a
          -- release before revision 10 after this one (a downgrade), which may have
          -- named the table with other templates (a review: the older ones deleted
          -- a:5, and the downgraded install's b:5 stayed cached). Its changes are dead
          -- letters then.
          AND NOT EXISTS (SELECT FROM cdc_invalidator.mapping_v1 n
                          WHERE n.id > m.id AND n.tables IS NULL)
    ), last AS (
        SELECT n.entry FROM named n ORDER BY n.id DESC LIMIT 1
    )
    SELECT CASE WHEN earlier IS NULL THEN l.entry
                ELSE l.entry || jsonb_build_object('earlier', earlier) END
    FROM last l,
         LATERAL (SELECT jsonb_agg(DISTINCT n.entry) AS earlier
                  FROM named n WHERE n.entry IS DISTINCT FROM l.entry) e
$retired$;
REVOKE EXECUTE ON FUNCTION cdc_invalidator.retired_table_v1(text) FROM PUBLIC;

-- Where each mapping's capture began, drawn by install's step after its commit
-- (record_boundary.sql): in trigger mode the queue's next id (a row a writer queued with
-- an earlier mapping's capture function got its id before that: ids come from the
-- queue's identity sequence, and the function is replaced in install's transaction); in
-- logical mode the WAL insert position (a transaction committed before install's commit
-- has its commit record before it). NULL or no row: not recorded (an install of an
-- earlier release, of the other mode, or its step after the commit did not run). A table
-- of its own: mapping_v1's rows stay as their install wrote them (their xmin is that
-- install's transaction).
CREATE TABLE IF NOT EXISTS cdc_invalidator.mapping_boundary_v1 (
    mapping  bigint PRIMARY KEY,  -- mapping_v1.id
    boundary bigint,              -- trigger mode: queue_v1.id
    lsn      pg_lsn               -- logical mode
);

-- mapping_eras_v1(fingerprint, tables, capture): for the last installed mapping with that
-- fingerprint (the listener's), each earlier mapping's entries for the tables both name
-- that differ from this one's (other templates, or another redis_db), with the queue ids
-- its capture queued (`capture` 'logical': the WAL positions of the commits, in bytes):
-- "from" (its own boundary, NULL: from the start) up to "below" (the boundary of the
-- next mapping that recorded one). A row queued under such a mapping and
-- read by a listener of a later one is rendered with that mapping's templates too:
-- before, only with the new ones, and the old template's key stayed cached (a:1 left,
-- b:1 deleted). A mapping never installed (the file edited, the listener restarted,
-- install not run yet) is compared by its `tables` (mapping_v1.tables' form): every
-- recorded mapping is earlier, and the last one's capture is still running ("below"
-- NULL: the listener asks again until install recorded a boundary). So is a mapping
-- installed whose boundary is not recorded yet (install records it right after its
-- commit: a listener that connected in between rendered what came before with the new
-- templates only, and never asked again), or never will be (an install by an earlier
-- release, or one that died in between: its earlier mappings' templates render every
-- change until the next install). Empty when no table's entry changed: nothing more
-- to render. As its owner, not PUBLIC's (templates, as
-- retired_table_v1()); a listener of an earlier release of revision 10 does not call it.
CREATE OR REPLACE FUNCTION cdc_invalidator.mapping_eras_v1(
    fingerprint text, tables jsonb, capture text)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $eras$
    WITH maps AS (
        SELECT m.id, m.fingerprint, m.tables,
               CASE $3 WHEN 'logical' THEN (b.lsn - '0/0'::pg_lsn)::bigint
                       ELSE b.boundary END AS boundary
        FROM cdc_invalidator.mapping_v1 m
        LEFT JOIN cdc_invalidator.mapping_boundary_v1 b ON b.mapping = m.id
    ), cur AS (
        (SELECT m.id, m.tables, m.boundary FROM maps m
         WHERE m.fingerprint = $1 AND m.tables IS NOT NULL
         ORDER BY m.id DESC LIMIT 1)
        UNION ALL
        SELECT NULL::bigint, $2, NULL::bigint
        WHERE $2 IS NOT NULL
          AND NOT EXISTS (SELECT FROM cdc_invalidator.mapping_v1 m WHERE m.fingerprint = $1)
    ), earlier AS (
        SELECT m.id, m.boundary AS "from", c.boundary IS NULL AS pending,
               (SELECT n.boundary FROM maps n
                WHERE n.id > m.id AND n.boundary IS NOT NULL
                ORDER BY n.id LIMIT 1) AS below,
               (SELECT jsonb_object_agg(t.key, t.value)
                FROM jsonb_each(m.tables) t
                WHERE c.tables ? t.key AND c.tables -> t.key IS DISTINCT FROM t.value) AS tables
        FROM maps m, cur c
        WHERE (c.id IS NULL OR m.id < c.id) AND m.tables IS NOT NULL
          -- (not from before a mapping that recorded no templates, as retired_table_v1())
          AND NOT EXISTS (SELECT FROM cdc_invalidator.mapping_v1 n
                          WHERE n.id > m.id AND n.tables IS NULL)
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'from', e."from", 'below', e.below, 'tables', e.tables) ORDER BY e.id), '[]')
    FROM earlier e
    WHERE e.tables IS NOT NULL AND (e.below IS NOT NULL OR e.pending)
$eras$;
REVOKE EXECUTE ON FUNCTION cdc_invalidator.mapping_eras_v1(text, jsonb, text) FROM PUBLIC;

-- retired_tables_v1(): every table an installed mapping named (not from before a mapping
-- that recorded no templates, as retired_table_v1()). Logical mode's listener sweeps
-- those its configuration lacks with the rest when its slot was lost: a change of a
-- table an install then stopped watching, committed before that install, was lost with
-- the slot too, and its keys stayed cached (a run: order:1 left after the listener
-- swept user:*). Names only, as the catalog tells them: PUBLIC may ask. A listener of
-- an earlier release does not call it (the revision stays 10: capture/logical.py asks
-- whether it exists first).
CREATE OR REPLACE FUNCTION cdc_invalidator.retired_tables_v1()
RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $retired_tables$
    SELECT coalesce(array_agg(DISTINCT t.name ORDER BY t.name), '{}')
    FROM cdc_invalidator.mapping_v1 m, jsonb_object_keys(m.tables) AS t(name)
    WHERE m.tables IS NOT NULL
      AND NOT EXISTS (SELECT FROM cdc_invalidator.mapping_v1 n
                      WHERE n.id > m.id AND n.tables IS NULL)
$retired_tables$;
GRANT EXECUTE ON FUNCTION cdc_invalidator.retired_tables_v1() TO PUBLIC;

-- A mapping's state: 'current' (installed last), 'superseded' (installed, then replaced),
-- 'behind' (never installed, and its file was written before the last install: a file
-- older than what was installed, as after uninstall, which takes the record with it, and
-- an install of another file) or 'not installed' (its file edited since the last
-- install: ahead of it). As its owner: a listener role (or `check`'s) needs no grant on
-- the table. It says no more than that, so PUBLIC may ask.
DROP FUNCTION IF EXISTS cdc_invalidator.mapping_state_v1(text);
CREATE OR REPLACE FUNCTION cdc_invalidator.mapping_state_v1(
    fingerprint text, written_at double precision DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $state$
    WITH last AS (
        SELECT m.fingerprint, m.installed_at
        FROM cdc_invalidator.mapping_v1 m ORDER BY m.id DESC LIMIT 1)
    SELECT CASE
        WHEN $1 IS NOT DISTINCT FROM (SELECT l.fingerprint FROM last l) THEN 'current'
        WHEN EXISTS (SELECT FROM cdc_invalidator.mapping_v1 m WHERE m.fingerprint = $1)
            THEN 'superseded'
        WHEN (SELECT l.installed_at FROM last l) > to_timestamp($2) THEN 'behind'
        ELSE 'not installed'
    END
$state$;
GRANT EXECUTE ON FUNCTION cdc_invalidator.mapping_state_v1(text, double precision) TO PUBLIC;

-- queue_statement_v1(op, names, labels, columns): the statement a capture function runs
-- for a statement of kind `op` (TG_OP) on a watched table: one INSERT ... SELECT from the
-- statement's transition table into the queue, copying `columns` (as PostgreSQL's text
-- output) under the names `labels` (the configuration's). `names` is the quoted
-- 'schema', 'table' pair the events carry. The one place that says how a row becomes a
-- queue row: watch() compiles its result into each table's capture function, and a
-- capture function whose columns were renamed since runs it again with the new names.
-- 'UPDATE ONE' is an UPDATE statement that changed at most one row (a capture function
-- knows it has before it runs the statement): its new row is read by a subquery, without
-- the numbering and join that pair several rows. Measured in the writer's backend (CPU
-- time of 10,000 single-row UPDATEs, 12 interleaved rounds): cheaper in 11 rounds of 12,
-- by a median 8 % of the statement's CPU (trigger and UPDATE together).
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_statement_v1(
    op text, names text, labels text[], columns text[])
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $statement$
DECLARE
    -- json_build_object('id', r.id::text, 'email', r.email::text)
    row_json text := 'json_build_object(' || coalesce((
        SELECT string_agg(format('%L, r.%I::text', l, c), ', ' ORDER BY i)
        FROM unnest(labels, columns) WITH ORDINALITY AS k (l, c, i)), '') || ')';
BEGIN
    RETURN CASE op
        WHEN 'INSERT' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row) '
            'SELECT %s, ''I'', %s FROM new_rows r', names, row_json)
        -- Old and new rows are paired by position. Were the pairing ever off, the
        -- statement's events would still name every old and new key. An UPDATE can
        -- have fewer new rows than old: a row moved to another partition whose BEFORE
        -- INSERT trigger drops it is deleted and not inserted. An old row without a
        -- partner is queued as a DELETE (its keys go), a new one as an INSERT.
        WHEN 'UPDATE' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, new_row) '
            'SELECT %1$s, CASE WHEN n.j IS NULL THEN ''D'' WHEN o.j IS NULL THEN ''I'' '
            'ELSE ''U'' END, o.j, n.j '
            'FROM (SELECT row_number() OVER () AS rn, %2$s AS j FROM old_rows r) o '
            'FULL JOIN (SELECT row_number() OVER () AS rn, %2$s AS j FROM new_rows r) n USING (rn)',
            names, row_json)
        WHEN 'UPDATE ONE' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, new_row) '
            'SELECT %1$s, CASE WHEN x.n IS NULL THEN ''D'' ELSE ''U'' END, x.o, x.n '
            'FROM (SELECT %2$s AS o, (SELECT %2$s FROM new_rows r) AS n FROM old_rows r) x',
            names, row_json)
        WHEN 'DELETE' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row) '
            'SELECT %s, ''D'', %s FROM old_rows r', names, row_json)
        WHEN 'TRUNCATE' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op) '
            'VALUES (%s, ''T'')', names)
    END;
END
$statement$;

-- pack_rows_v1(): the most changes one queue row holds (a pack). Measured on 1M-row
-- statements: the writer's cost is flat from 1,000 to 20,000 (the aggregation, not the
-- queue rows, costs it), and smaller packs keep the listener's reads fine-grained and
-- a dead-lettered pack small.
CREATE OR REPLACE FUNCTION cdc_invalidator.pack_rows_v1() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 1000';

-- queue_packed_v1(op, names, labels, columns): queue_statement_v1 for a statement that
-- changed several rows: one queue row per pack of pack_rows_v1() rows, each key column
-- an array of its values' text (array_agg keeps NULLs: a NULL field skips its key, as
-- in a single row). Packs are numbered in the transition table's order (row_number),
-- so an UPDATE's old and new packs of one number hold the same rows, in the same order
-- as far as PostgreSQL keeps it; were that order ever off, the pack would still name
-- every old and every new key.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_packed_v1(
    op text, names text, labels text[], columns text[])
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $packed$
DECLARE
    -- (SELECT (row_number() OVER () - 1) / 1000 AS g, r.id::text AS c1 FROM old_rows r),
    -- put together by concatenation: a column's name may hold a % that a format() of
    -- text already holding it would read as a placeholder (install failed, "too few
    -- arguments for format()")
    numbered text := format('(SELECT (row_number() OVER () - 1) / %s AS g', cdc_invalidator.pack_rows_v1())
        || coalesce((SELECT string_agg(format(', r.%I::text AS c%s', c, i), '' ORDER BY i)
                     FROM unnest(columns) WITH ORDINALITY AS k (c, i)), '')
        || ' FROM ';
    old_numbered text := numbered || 'old_rows r) r';
    new_numbered text := numbered || 'new_rows r) r';
    -- json_build_object('id', array_agg(r.c1), ...)
    pack text := 'json_build_object(' || coalesce((
        SELECT string_agg(format('%L, array_agg(r.c%s)', l, i), ', ' ORDER BY i)
        FROM unnest(labels) WITH ORDINALITY AS k (l, i)), '') || ')';
BEGIN
    RETURN CASE op
        WHEN 'INSERT' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row, rows) '
            'SELECT %s, ''I'', %s, count(*)::int FROM %s GROUP BY r.g',
            names, pack, new_numbered)
        -- Each side aggregated on its own and the packs joined by number: a join of a
        -- thousand packs, not of a million rows. Only for as many new rows as old:
        -- watch() counts them on a partitioned table, where a moved row can be dropped.
        -- (A FULL JOIN and a LATERAL choice that queued size-mismatched packs as DELETE
        -- and INSERT packs made every 300k-row UPDATE's writer 1.9 -> 2.9 s in four
        -- interleaved rounds: not taken.)
        WHEN 'UPDATE' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, new_row, rows) '
            'SELECT %1$s, ''U'', o.j, n.j, o.n '
            'FROM (SELECT r.g, %2$s AS j, count(*)::int AS n FROM %3$s GROUP BY r.g) o '
            'JOIN (SELECT r.g, %2$s AS j FROM %4$s GROUP BY r.g) n USING (g)',
            names, pack, old_numbered, new_numbered)
        WHEN 'DELETE' THEN format(
            'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, rows) '
            'SELECT %s, ''D'', %s, count(*)::int FROM %s GROUP BY r.g',
            names, pack, old_numbered)
    END;
END
$packed$;

-- one_pack_rows_v1(): a statement of several rows, up to this many, is queued as one
-- pack, its key columns aggregated in one pass over the transition table: no numbering
-- and no grouping, which were most of what packs cost its writer (measured in
-- docs/DBA.md, "Trigger mode: packs"). A larger statement is packed by pack_rows_v1()
-- as before: one pack would hold all its rows in the writer's memory at once.
CREATE OR REPLACE FUNCTION cdc_invalidator.one_pack_rows_v1() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 10000';

-- one_pack_bytes_v1(): the most bytes of key-column text (its values' lengths summed) a
-- row of one pack may have, so that a pack holds at most one_pack_rows_v1() times that
-- in the writer's memory (10 MB a side; its JSON at most six times that, a control
-- character written \u0001). A bound per value was not enough: a table of 18 text key
-- columns of 1,000 such bytes made one pack's JSON pass PostgreSQL's 1 GB, and the
-- statement failed (a helper's reproduction, "Cannot enlarge string buffer"). A
-- statement with a longer row is packed by pack_rows_v1(), whose packs of a tenth as
-- many rows are what it was before one pack existed.
CREATE OR REPLACE FUNCTION cdc_invalidator.one_pack_bytes_v1() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 1024';

-- queue_one_pack_v1(op, names, labels, columns, packs): the PL/pgSQL statements that
-- queue a statement of several rows as one pack when it has at most one_pack_rows_v1()
-- rows, none with more key-column text than one_pack_bytes_v1(), and else run `packs`
-- (queue_packed_v1's, or what stands in for it). Each side is read through a LIMIT one
-- past the bound: a larger statement costs the reading of that many rows more. A longer
-- row is left out of the arrays (FILTER): only its length is kept, which sends the
-- statement to `packs`. An UPDATE with fewer new rows than old (a row
-- moved to a partition whose BEFORE INSERT trigger drops it) is queued as an INSERT
-- pack of its new rows and a DELETE pack of its old ones, as watch() does for packs on
-- a partitioned table; a plain table's UPDATE always has as many, and the count costs
-- nothing: it is the aggregate's.
-- Every key column is measured, whatever its type: a column retyped since install (an
-- integer to text) is compiled as it was, and nothing tells the capture function so
-- (what measuring costs: docs/DBA.md, "Trigger mode: packs").
-- The capture function declares old_pack, new_pack (json), and old_n, new_n (the
-- sides' rows), old_w, new_w (their longest row's bytes), bigint.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_one_pack_v1(
    op text, names text, labels text[], columns text[], packs text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $one_pack$
DECLARE
    bound integer := cdc_invalidator.one_pack_rows_v1();
    bytes integer := cdc_invalidator.one_pack_bytes_v1();
    -- SELECT json_build_object('email', array_agg(r.c1) FILTER (WHERE r.w <= 1024), ...),
    --        count(*), coalesce(max(r.w), 0) INTO old_pack, old_n, old_w
    -- FROM (SELECT r.*, coalesce(octet_length(r.c1), 0)::bigint + ... AS w
    --       FROM (SELECT r.email::text AS c1, ... FROM old_rows r LIMIT 10001) r) r
    -- (put together by concatenation: a column's name may hold a % that a format() of
    -- text already holding it would read as a placeholder)
    aggs text := 'SELECT json_build_object(' || coalesce((
        SELECT string_agg(format('%L, array_agg(r.c%s) FILTER (WHERE r.w <= %s)', l, i, bytes),
                          ', ' ORDER BY i)
        FROM unnest(labels) WITH ORDINALITY AS k (l, i)), '')
        || '), count(*), coalesce(max(r.w), 0) INTO ';
    rows text := ' FROM (SELECT r.*, ' || coalesce((
        SELECT string_agg(format('coalesce(octet_length(r.c%s), 0)::bigint', i), ' + ' ORDER BY i)
        FROM unnest(columns) WITH ORDINALITY AS k (c, i)), '0')
        || ' AS w FROM (SELECT ' || coalesce((
        SELECT string_agg(format('r.%I::text AS c%s', c, i), ', ' ORDER BY i)
        FROM unnest(columns) WITH ORDINALITY AS k (c, i)), 'NULL') || ' FROM ';
    bounded text := ' r LIMIT ' || (bound + 1) || ') r) r';
    old_side text := aggs || 'old_pack, old_n, old_w' || rows || 'old_rows' || bounded;
    new_side text := aggs || 'new_pack, new_n, new_w' || rows || 'new_rows' || bounded;
    insert text := 'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, new_row, rows) ';
BEGIN
    RETURN CASE op
        WHEN 'INSERT' THEN format(
            '%1$s; IF new_n > %2$s OR new_w > %3$s THEN %6$s; '
            'ELSE %4$sVALUES (%5$s, ''I'', NULL, new_pack, new_n); END IF',
            new_side, bound, bytes, insert, names, packs)
        WHEN 'DELETE' THEN format(
            '%1$s; IF old_n > %2$s OR old_w > %3$s THEN %6$s; '
            'ELSE %4$sVALUES (%5$s, ''D'', old_pack, NULL, old_n); END IF',
            old_side, bound, bytes, insert, names, packs)
        -- (The new side is read only when the old one fits; when it is not, old_n or
        -- old_w is over, so the NULLs it leaves are never compared. The DELETE pack
        -- last: it is never empty, so FOUND sends the wake-up.)
        WHEN 'UPDATE' THEN format(
            '%1$s; IF old_n <= %3$s AND old_w <= %4$s THEN %2$s; END IF; '
            'IF old_n > %3$s OR old_w > %4$s OR new_n > %3$s OR new_w > %4$s THEN %7$s; '
            'ELSIF new_n = old_n THEN %5$sVALUES (%6$s, ''U'', old_pack, new_pack, old_n); '
            'ELSE %5$sSELECT %6$s, ''I'', NULL, new_pack, new_n WHERE new_n > 0; '
            '%5$sVALUES (%6$s, ''D'', old_pack, NULL, old_n); END IF',
            old_side, new_side, bound, bytes, insert, names, packs)
    END;
END
$one_pack$;

-- queue_judged_update_v1(names, labels, columns, pk, counted): the UPDATE statement of a
-- table with a column filter: only the rows in which a counted column changed are
-- queued. Old and new rows are paired by primary key (a FULL JOIN of the transition
-- tables on `pk`), not by position: each row is judged against its own old version. A
-- row without a partner (its primary key changed) is always queued, as a DELETE of the
-- old row and an INSERT of the new one, which delete the same keys as an UPDATE would.
-- A value changed when its text (::text, as keys render and apps read it, compared
-- byte for byte in collation "C") changed: that works for every type, including those
-- without an equality operator (json, point), and an equality that is looser than the
-- text (numeric 1.0 = 1.00, a case-insensitive collation) never hides a change. Columns
-- are compared one after the other and the first difference decides; a large value
-- left unchanged is read (detoasted) only when its length is the same on both sides.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_judged_update_v1(
    names text, labels text[], columns text[], pk text[], counted text[])
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $judged$
DECLARE
    -- Every column the statement reads, projected as c1, c2, ... on both sides.
    used text[] := ARRAY(SELECT DISTINCT c FROM unnest(pk || counted || columns) c ORDER BY c);
    project text;
    old_json text;
    new_json text;
    pairs text;
    changed text;
BEGIN
    SELECT string_agg(format('r.%I AS c%s', c, i), ', ' ORDER BY i) INTO project
    FROM unnest(used) WITH ORDINALITY AS u (c, i);
    SELECT 'json_build_object(' || coalesce(string_agg(
               format('%L, o.c%s::text', l, array_position(used, c)), ', ' ORDER BY i), '') || ')',
           'json_build_object(' || coalesce(string_agg(
               format('%L, n.c%s::text', l, array_position(used, c)), ', ' ORDER BY i), '') || ')'
    INTO old_json, new_json
    FROM unnest(labels, columns) WITH ORDINALITY AS k (l, c, i);
    SELECT string_agg(format('o.c%1$s = n.c%1$s', array_position(used, c)), ' AND ') INTO pairs
    FROM unnest(pk) c;
    SELECT coalesce(string_agg(format(
               '(o.c%1$s::text COLLATE "C") IS DISTINCT FROM (n.c%1$s::text COLLATE "C")',
               array_position(used, c)), ' OR '), 'false') INTO changed
    FROM unnest(counted) c;
    RETURN format(
        'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, new_row) '
        'SELECT %1$s, CASE WHEN o.here IS NULL THEN ''I'' WHEN n.here IS NULL THEN ''D'' ELSE ''U'' END, '
        'CASE WHEN o.here THEN %2$s END, CASE WHEN n.here THEN %3$s END '
        'FROM (SELECT true AS here, %4$s FROM old_rows r) o '
        'FULL JOIN (SELECT true AS here, %4$s FROM new_rows r) n ON %5$s '
        'WHERE o.here IS NULL OR n.here IS NULL OR %6$s',
        names, old_json, new_json, project, pairs, changed);
END
$judged$;

-- queue_judged_packed_v1(names, labels, columns, pk, counted): queue_judged_update_v1
-- for an UPDATE of several rows: the same judgement row by row, the rows it queues
-- packed (queue_packed_v1) by what each became, UPDATE, DELETE or INSERT (a changed
-- primary key), up to pack_rows_v1() rows per pack.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_judged_packed_v1(
    names text, labels text[], columns text[], pk text[], counted text[])
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $judged_packed$
DECLARE
    used text[] := ARRAY(SELECT DISTINCT c FROM unnest(pk || counted || columns) c ORDER BY c);
    project text;
    sides text;
    old_pack text;
    new_pack text;
    pairs text;
    changed text;
BEGIN
    SELECT string_agg(format('r.%I AS c%s', c, i), ', ' ORDER BY i) INTO project
    FROM unnest(used) WITH ORDINALITY AS u (c, i);
    -- The key columns' text on both sides, as o1, n1, o2, n2, ...
    SELECT coalesce(string_agg(format(', o.c%1$s::text AS o%2$s, n.c%1$s::text AS n%2$s',
                                      array_position(used, c), i), '' ORDER BY i), ''),
           'json_build_object(' || coalesce(string_agg(
               format('%L, array_agg(j.o%s)', l, i), ', ' ORDER BY i), '') || ')',
           'json_build_object(' || coalesce(string_agg(
               format('%L, array_agg(j.n%s)', l, i), ', ' ORDER BY i), '') || ')'
    INTO sides, old_pack, new_pack
    FROM unnest(labels, columns) WITH ORDINALITY AS k (l, c, i);
    SELECT string_agg(format('o.c%1$s = n.c%1$s', array_position(used, c)), ' AND ') INTO pairs
    FROM unnest(pk) c;
    SELECT coalesce(string_agg(format(
               '(o.c%1$s::text COLLATE "C") IS DISTINCT FROM (n.c%1$s::text COLLATE "C")',
               array_position(used, c)), ' OR '), 'false') INTO changed
    FROM unnest(counted) c;
    RETURN format(
        'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, old_row, new_row, rows) '
        'SELECT %1$s, j.op, CASE WHEN j.op <> ''I'' THEN %2$s END, '
        'CASE WHEN j.op <> ''D'' THEN %3$s END, count(*)::int '
        'FROM (SELECT (row_number() OVER () - 1) / %8$s AS g, '
        'CASE WHEN o.here IS NULL THEN ''I'' WHEN n.here IS NULL THEN ''D'' ELSE ''U'' END AS op%7$s '
        'FROM (SELECT true AS here, %4$s FROM old_rows r) o '
        'FULL JOIN (SELECT true AS here, %4$s FROM new_rows r) n ON %5$s '
        'WHERE o.here IS NULL OR n.here IS NULL OR %6$s) j '
        'GROUP BY j.g, j.op',
        names, old_pack, new_pack, project, pairs, changed, sides, cdc_invalidator.pack_rows_v1());
END
$judged_packed$;

-- The channel the NOTIFY payloads go on (queue_early_v1), a name drawn at random by
-- the first install and kept here, where only the installing role reads it: LISTEN needs
-- no privilege, so on a channel whose name anyone can know (the wake-up's,
-- cdc_invalidator_v1) every role that can connect would read the key columns of every
-- one-row change, whatever it may SELECT. Capture functions send through
-- notify_row_v1() and the listener LISTENs through listen_v1(): neither shows the name
-- (no function body holds it, and pg_stat_activity shows the listener's call, not a
-- LISTEN statement). 122 random bits (gen_random_uuid(): pg_strong_random()).
CREATE TABLE IF NOT EXISTS cdc_invalidator.payload_channel_v1 (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    channel   text NOT NULL
);
REVOKE ALL ON TABLE cdc_invalidator.payload_channel_v1 FROM PUBLIC;
-- (and from any other role: sql/take_back_grants.sql, last in each install)
INSERT INTO cdc_invalidator.payload_channel_v1 (channel)
VALUES ('cdc_invalidator_' || replace(gen_random_uuid()::text, '-', ''))
ON CONFLICT (singleton) DO NOTHING;

-- notify_row_v1(payload): a capture function's NOTIFY of its row on the payload
-- channel (not where it is 8000 bytes or more, NOTIFY's limit, or the channel's row is
-- gone: the queue read has the row all the same), then the empty wake-up on
-- cdc_invalidator_v1, for a listener that does not LISTEN on the payload channel (an
-- earlier release's, which this revision still lets start; one whose role may not
-- call listen_v1(); one on a name a new draw replaced), which would otherwise wait for
-- its poll (an earlier release's: 5.5-8 s with poll_interval_ms = 10000); true.
-- Granted by watch() to the watched tables' owners, whose capture functions call it (so
-- they may send payloads of their own too, which the listener trusts no more than any:
-- capture/early.py); not to PUBLIC. A payload sent sets cdc_invalidator.payload_sent
-- until the transaction ends, and queue_early_v1 then sends the empty wake-up alone:
-- payloads do not fold, and a transaction of 20,000 one-row UPDATEs that sent one each
-- took 1.4-1.7 s against 0.8-1.1 s with the wake-up (no listener; 3 rounds, a busy
-- 2-vCPU VM). Its first row is deleted early, the rest when the queue read finds them.
CREATE OR REPLACE FUNCTION cdc_invalidator.notify_row_v1(payload text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $notify_row$
BEGIN
    IF octet_length(payload) < 8000 THEN  -- (NOTIFY's limit)
        PERFORM pg_notify(c.channel, payload) FROM cdc_invalidator.payload_channel_v1 c;
        IF FOUND THEN
            -- (local to the transaction, not to this function: the SET clause saves
            -- only its own)
            PERFORM set_config('cdc_invalidator.payload_sent', 'on', true);
        END IF;
    END IF;
    PERFORM pg_notify('cdc_invalidator_v1', '');
    RETURN true;
END
$notify_row$;
REVOKE ALL ON FUNCTION cdc_invalidator.notify_row_v1(text) FROM PUBLIC;

-- listen_v1(): LISTEN on the wake-up's channel and the payload channel, for the
-- listener (granted by grant_listener), which reads the payloads only from there.
-- Without the channel's row (deleted to draw a new name, until `install` draws it), on
-- the wake-up's alone: format('%I', NULL) raised, and the listener could not connect.
CREATE OR REPLACE FUNCTION cdc_invalidator.listen_v1()
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $listen$
DECLARE
    payloads text := (SELECT channel FROM cdc_invalidator.payload_channel_v1);
BEGIN
    LISTEN cdc_invalidator_v1;
    IF payloads IS NOT NULL THEN
        EXECUTE format('LISTEN %I', payloads);
    END IF;
END
$listen$;
REVOKE ALL ON FUNCTION cdc_invalidator.listen_v1() FROM PUBLIC;

-- queue_early_v1(statement, head): `statement` (queue_statement_v1's INSERT, DELETE or
-- UPDATE ONE, or the UPDATE of queue_judged_update_v1) for a statement that changed
-- one row, whose queue row also goes to the listener in the NOTIFY payload, on the
-- payload channel (notify_row_v1()): `head` || xid, the writer's now() and [[op,
-- old_row, new_row]] || '}' (see watch()). The listener deletes its keys at once,
-- before it reads the queue (which still acknowledges the row, and knows it by its
-- transaction, its writer's backend, queued as pid, and its content). Statements,
-- not a row filter: the INSERT queues the row with its pid; then, only while the
-- listener is quiet (wake_needed_v1(): busy, it reads the queue on its own, and a
-- notifying commit would wait for the one before) and for the transaction's first
-- payload (later ones send the empty wake-up, which folds), the row is read again
-- from the transition tables (one row) and sent: no RETURNING, which would need
-- SELECT on the queue, every table's rows, for the table owners the capture functions
-- run as. A busy listener's writer pays the pid and the lock test, as with the
-- wake-up. (Built once, in the INSERT's row filter, the payload's expression and its
-- copies of the row's subqueries cost every one-row statement its plan's start-up:
-- about 7 us more than the wake-up's, each of 20,000 UPDATEs in one transaction, even
-- those that sent nothing.) A row the filter of a judged UPDATE drops is not queued
-- and sends nothing. Packs (several rows) never carry a payload.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_early_v1(statement text, head text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $early$
DECLARE
    parts text[] := regexp_match(statement,
        '^INSERT INTO cdc_invalidator\.queue_v1 \(([a-z_, ]+)\) (SELECT .*)$');
BEGIN
    IF parts IS NULL OR parts[1] LIKE '%rows%' THEN
        RAISE EXCEPTION 'cdc_invalidator.queue_early_v1: not a single-row queue INSERT: %', statement;
    END IF;
    RETURN format(
        'INSERT INTO cdc_invalidator.queue_v1 (%1$s, pid) SELECT %1$s, '
        'CASE WHEN current_setting(''cdc_invalidator.notify'', true) = ''off'' THEN NULL '
        'ELSE pg_backend_pid() END FROM (%2$s) s (%1$s); '
        'IF FOUND AND current_setting(''cdc_invalidator.notify'', true) IS DISTINCT FROM ''off'' THEN '
        'IF %6$s THEN '
        'IF current_setting(''cdc_invalidator.payload_sent'', true) = ''on'' THEN '
        'PERFORM pg_notify(''cdc_invalidator_v1'', ''''); '
        'ELSE PERFORM cdc_invalidator.notify_row_v1(%3$L || pg_current_xact_id()::text '
        '|| '',"a":'' || extract(epoch FROM now())::text '
        '|| '',"r":['' || json_build_array(s.op, %4$s, %5$s)::text || '']}'') '
        'FROM (%2$s) s (%1$s); '
        'END IF; END IF; END IF',
        parts[1], parts[2], head,
        CASE WHEN parts[1] LIKE '%old_row%' THEN 's.old_row' ELSE 'NULL' END,
        CASE WHEN parts[1] LIKE '%new_row%' THEN 's.new_row' ELSE 'NULL' END,
        cdc_invalidator.wake_needed_v1());
END
$early$;

-- wake_needed_v1(): a boolean expression, whether a capture function's statement should
-- wake the listener, with the empty wake-up (wake_up_v1(): the statement that sends it)
-- or a payload (queue_early_v1()). PostgreSQL serializes the commits of transactions
-- that sent a NOTIFY, across the cluster, from just before the commit record until the
-- commit is done, its WAL flush included: they share no flush. Measured with pgbench
-- (single-row UPDATEs, durable commits, 8 clients on 2 vCPUs): 0.26 of the unwatched
-- throughput with a trigger that queued a constant row and sent the wake-up, 0.77
-- without it. So the wake-up is sent only while the listener is quiet: while busy it
-- reads the queue on its own and holds the lock (hashtext('cdc_invalidator.queue_v1'), 1)
-- (sql/busy.sql), which a writer tests by taking it shared and letting go in one CASE
-- (CASE keeps the order: the second only if the first took it; in parentheses, or
-- PL/pgSQL would end an IF's condition at the CASE's THEN). A writer that finds it held
-- takes (.., 2) shared until its transaction ends, then tests again. It never waits:
-- where (.., 2) is held exclusive (by the listener's test below for an instant, or by
-- someone else's session), it sends the wake-up, as where (.., 1) is free. The
-- listener, gone quiet (LISTEN, then the first lock let go: sql/quiet.sql), polls until
-- it can take the second (sql/writers_seen.sql), then reads the queue once more: a
-- writer that sent nothing has ended before that read. The first key is the consumer
-- lock's (sql/take_lock.sql), whose one-key lock space is another than these two-key
-- ones. Nor while PostgreSQL's notification queue is half full or more (a session that
-- LISTENs and then idles in a transaction holds it for the whole server): once it is
-- full, every commit that sent a NOTIFY fails, and the wake-up is only a wake-up (the
-- listener's poll finds the rows): with max_notify_queue_pages = 64 and the queue
-- filled, a watched one-row UPDATE failed at commit ("too many notifications in the
-- NOTIFY queue"); it commits now (tests/test_notify_queue.py). Nor from a commit that
-- may wait for a synchronous standby (synchronous_standby_names set): the serialization
-- lasts until the standby answers, and with it down every other notifying commit of the
-- server waited behind it, those made with synchronous_commit = local too (a review: a
-- local one-row UPDATE waited for as long as the standby was down). Whatever
-- synchronous_commit says when the statement runs: the commit waits by the value it has
-- at COMMIT, which a SET LOCAL after the statement, or the end of a function declared
-- with SET synchronous_commit = off, changes (a review: a transaction that wrote with
-- local and committed with on held a local writer's commit 5 s, until cancelled). Such
-- a writer takes (.., 2) shared instead, as one that found the listener busy does, and
-- sends nothing even where it cannot (the listener's test holding it that instant: a
-- NOTIFY then would hold the others again): while synchronous standbys are configured
-- the quiet listener reads the queue every 10 ms (trigger_queue.py's SYNC_READ_S). (IS
-- NULL of the lock's answer, never NULL: false, the lock tried all the same, where a
-- constant false could be folded and the call skipped.)
CREATE OR REPLACE FUNCTION cdc_invalidator.wake_needed_v1() RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $wake_needed$
    SELECT format(
        '(CASE WHEN current_setting(''synchronous_standby_names'') <> '''' '
        'THEN pg_try_advisory_xact_lock_shared(%1$s, 2) IS NULL '
        'WHEN pg_try_advisory_lock_shared(%1$s, 1) THEN pg_advisory_unlock_shared(%1$s, 1) '
        'WHEN pg_try_advisory_xact_lock_shared(%1$s, 2) THEN coalesce(CASE WHEN '
        'pg_try_advisory_lock_shared(%1$s, 1) THEN pg_advisory_unlock_shared(%1$s, 1) END, false) '
        'ELSE true END AND pg_notification_queue_usage() < 0.5)',
        hashtext('cdc_invalidator.queue_v1'))
$wake_needed$;

CREATE OR REPLACE FUNCTION cdc_invalidator.wake_up_v1() RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $wake_up$
    SELECT format('IF %s THEN PERFORM pg_notify(''cdc_invalidator_v1'', ''''); END IF',
                  cdc_invalidator.wake_needed_v1())
$wake_up$;

-- queue_sweep_row_v1(names, marker): the statement that queues a sweep of a table's
-- templates instead of its changes: a TRUNCATE event whose new row is `marker` (SQL of a
-- json_build_object saying why). The one place that says how a capture function queues
-- a sweep; queue_sweep_v1 and queue_bulk_sweep_v1 give the marker.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_sweep_row_v1(names text, marker text)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $sweep_row$
    SELECT format(
        'INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row) '
        'VALUES (%s, ''T'', %s)', names, marker)
$sweep_row$;

-- queue_sweep_v1(names, reason): a sweep for a change that cannot be rendered as it
-- should be, carrying `reason` ({"unrenderable": reason}), which the listener logs and
-- counts.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_sweep_v1(names text, reason text)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $sweep$
    SELECT cdc_invalidator.queue_sweep_row_v1(
        names, format('json_build_object(''unrenderable'', %L)', reason))
$sweep$;

-- queue_bulk_sweep_v1(names, bulk_sweep_rows): a sweep for a statement of at least
-- `bulk_sweep_rows` rows (watch()'s bulk_sweep_rows), carrying that number ({"bulk": N}),
-- which the listener counts.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_bulk_sweep_v1(names text, bulk_sweep_rows integer)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $bulk$
    SELECT cdc_invalidator.queue_sweep_row_v1(
        names, format('json_build_object(''bulk'', %s)', bulk_sweep_rows))
$bulk$;

-- queue_drifted_v1(table, labels, attnums, op, names): the statement for a capture
-- function whose compiled column names no longer all exist (a column was renamed or
-- dropped since watch()). Columns are found again by attnum, which a rename keeps: the
-- events carry the same values under the configured names, so invalidation follows the
-- rename. When a key column is gone, the change cannot be rendered: the statement queues
-- a sweep of the table's templates instead (a TRUNCATE event with the reason, which the
-- listener logs and counts). Never an error: a migration must not fail a write.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_drifted_v1(
    tbl regclass, labels text[], attnums int2[], op text, names text)
RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $drifted$
DECLARE
    current text[];
    gone    text;
BEGIN
    SELECT array_agg(a.attname::text ORDER BY k.i),
           string_agg(quote_ident(k.l), ', ' ORDER BY k.i) FILTER (WHERE a.attname IS NULL)
    INTO current, gone
    FROM unnest(labels, attnums) WITH ORDINALITY AS k (l, n, i)
    LEFT JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.n AND NOT a.attisdropped;
    IF gone IS NOT NULL OR attnums IS NULL THEN
        RETURN cdc_invalidator.queue_sweep_v1(names,
            format('key column %s of %s no longer exists', coalesce(gone, '?'), tbl));
    END IF;
    RETURN cdc_invalidator.queue_statement_v1(op, names, labels, current);
END
$drifted$;

-- prints_alike_v1(type): whether a value of this type prints as the same text (::text)
-- in every session, whatever its TimeZone, DateStyle, IntervalStyle, extra_float_digits
-- and bytea_output. A capture function pins those settings (a SET clause, which
-- saves and restores them on every call: a few percent of every write) only when a
-- column it renders or judges is of a type for which this is false. The list is short
-- on purpose: a type is on it only if its output function reads none of those settings
-- (integers, numeric, strings, uuid, bool, oid, enums). Everything else counts as
-- depending on them: dates and times, intervals, floats, arrays, ranges, composites and
-- any type an extension brings. A domain prints as its base type (domains over domains
-- are followed down).
CREATE OR REPLACE FUNCTION cdc_invalidator.prints_alike_v1(typ oid)
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $alike$
    WITH RECURSIVE chain (oid, typtype, typbasetype) AS (
        SELECT t.oid, t.typtype, t.typbasetype FROM pg_type t WHERE t.oid = typ
        UNION ALL
        SELECT t.oid, t.typtype, t.typbasetype
        FROM chain c JOIN pg_type t ON t.oid = c.typbasetype
        WHERE c.typtype = 'd')
    SELECT coalesce(bool_and(c.typtype = 'e' OR c.oid IN (
               'int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'numeric'::regtype,
               'text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'name'::regtype,
               'uuid'::regtype, 'bool'::regtype, 'oid'::regtype)), false)
    FROM chain c WHERE c.typtype <> 'd'
$alike$;

-- prints_bytea_v1(type): whether a value of this type may print a bytea (bytea itself,
-- or an array, composite, range or any type an extension brings, which may hold one),
-- whose text bytea_output sets; false for the other built-in types and for enums. A
-- domain prints as its base type.
CREATE OR REPLACE FUNCTION cdc_invalidator.prints_bytea_v1(typ oid)
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $bytea$
    WITH RECURSIVE chain (oid, typtype, typbasetype, typcategory) AS (
        SELECT t.oid, t.typtype, t.typbasetype, t.typcategory FROM pg_type t WHERE t.oid = typ
        UNION ALL
        SELECT t.oid, t.typtype, t.typbasetype, t.typcategory
        FROM chain c JOIN pg_type t ON t.oid = c.typbasetype
        WHERE c.typtype = 'd')
    SELECT coalesce(bool_or(c.oid = 'bytea'::regtype OR c.typtype NOT IN ('b', 'e')
                            OR (c.oid >= 16384 AND c.typtype <> 'e') OR c.typcategory = 'A'), true)
    FROM chain c WHERE c.typtype <> 'd'
$bytea$;

-- prints_alike_probe_v1(value): one overload per type prints_alike_v1() lists (anyenum
-- for the enums), and none for any other type. A capture function compiled without the
-- pinned settings names each column it renders or judges in a call to it, inside its
-- never-run probe: once such a column is retyped to a type that needs the settings, the
-- probe no longer plans (undefined_function), and queue_drifted_unpinned_v1 takes over.
-- Overload resolution treats a domain as its base type, and takes an implicit cast when
-- no overload matches exactly: the types that reach one that way print alike too
-- ("char" and the catalog's internal types as text, the reg* types as oid, which print
-- by the pinned search_path). Created from prints_alike_v1(), so the two never disagree.
DO $probes$
DECLARE
    t regtype;
BEGIN
    FOR t IN
        SELECT p.oid::regtype FROM pg_type p
        WHERE p.typtype = 'b' AND p.typnamespace = 'pg_catalog'::regnamespace
          AND cdc_invalidator.prints_alike_v1(p.oid)
        UNION ALL SELECT 'anyenum'::regtype
    LOOP
        EXECUTE format('CREATE OR REPLACE FUNCTION cdc_invalidator.prints_alike_probe_v1(%s) '
                       'RETURNS boolean LANGUAGE sql IMMUTABLE AS ''SELECT true''', t);
    END LOOP;
END
$probes$;

-- prints_plain_probe_v1(value): the same for a capture function that pins the print
-- settings but not bytea_output (no column it renders could hold a bytea at install):
-- one overload per built-in type prints_bytea_v1() is false for (anyenum for the enums).
-- Its probe names each key column in a call to it: once one is retyped to a bytea (or a
-- type that may hold one), the probe no longer plans, and queue_drifted_no_bytea_v1
-- takes over. A type reaches an overload by an implicit cast only when none matches
-- exactly; no built-in cast from a bytea, an array, a composite or a range is implicit.
DO $probes$
DECLARE
    t regtype;
BEGIN
    FOR t IN
        SELECT p.oid::regtype FROM pg_type p
        WHERE p.typtype = 'b' AND p.typnamespace = 'pg_catalog'::regnamespace
          AND NOT cdc_invalidator.prints_bytea_v1(p.oid)
        UNION ALL SELECT 'anyenum'::regtype
    LOOP
        EXECUTE format('CREATE OR REPLACE FUNCTION cdc_invalidator.prints_plain_probe_v1(%s) '
                       'RETURNS boolean LANGUAGE sql IMMUTABLE AS ''SELECT true''', t);
    END LOOP;
END
$probes$;

-- queue_drifted_retyped_v1(table, labels, attnums, op, names, bytes): queue_drifted_v1
-- for a capture function whose probe failed (a column was renamed, dropped or retyped)
-- and that does not pin every print setting. A key column now of a type whose text
-- depends on a setting the function leaves to the writer's session would render as that
-- session prints it, which can differ from the key the app built: rather than leave a
-- stale key, the statement queues a sweep of the table's templates (a cold cache, not a
-- stale one) and says to run install, which compiles the function with the settings
-- pinned. With `bytes`, the function pins all but bytea_output, and the types counted are
-- those that may print a bytea; else it pins none, and they are those that do not print
-- alike. Otherwise (a rename; a retyped column that is not a key, judged by the filter,
-- which the drifted statement does not apply) queue_drifted_v1 decides.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_drifted_retyped_v1(
    tbl regclass, labels text[], attnums int2[], op text, names text, bytes boolean)
RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $retyped$
DECLARE
    retyped text;
BEGIN
    SELECT string_agg(format('key column %s%s is now of type %s', quote_ident(k.l),
                             CASE WHEN a.attname <> k.l THEN format(' (renamed %I)', a.attname) END,
                             format_type(a.atttypid, a.atttypmod)),
                      ', ' ORDER BY k.i)
    INTO retyped
    FROM unnest(labels, attnums) WITH ORDINALITY AS k (l, n, i)
    JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.n AND NOT a.attisdropped
    WHERE CASE WHEN bytes THEN cdc_invalidator.prints_bytea_v1(a.atttypid)
               ELSE NOT cdc_invalidator.prints_alike_v1(a.atttypid) END;
    IF retyped IS NOT NULL THEN
        RETURN cdc_invalidator.queue_sweep_v1(names, format(
            'in %s, %s, whose text depends on the writing session''s %s: '
            'run install to render it alike in every session', tbl, retyped,
            CASE WHEN bytes THEN 'bytea_output' ELSE 'settings' END));
    END IF;
    RETURN cdc_invalidator.queue_drifted_v1(tbl, labels, attnums, op, names);
END
$retyped$;

-- queue_drifted_unpinned_v1(table, labels, attnums, op, names): what a capture function
-- compiled without the pinned settings calls when its probe fails (the name those of
-- earlier releases call); queue_drifted_no_bytea_v1, one pinned without bytea_output.
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_drifted_unpinned_v1(
    tbl regclass, labels text[], attnums int2[], op text, names text)
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $unpinned$
    SELECT cdc_invalidator.queue_drifted_retyped_v1(tbl, labels, attnums, op, names, false)
$unpinned$;

CREATE OR REPLACE FUNCTION cdc_invalidator.queue_drifted_no_bytea_v1(
    tbl regclass, labels text[], attnums int2[], op text, names text)
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $no_bytea$
    SELECT cdc_invalidator.queue_drifted_retyped_v1(tbl, labels, attnums, op, names, true)
$no_bytea$;

-- queue_sweep_once_v1(schema, table, reason[, writer]): queue one sweep of the table's
-- templates (by the name its events carry) for the current transaction, however many of
-- its statements or rows ask (under SERIALIZABLE one per call: see below), carrying
-- `reason` ({"unrenderable": reason}), which the listener logs and counts. For the
-- triggers and event triggers that see a change they cannot render:
-- sweep_untriggered_v1 below, and the rebuild guard (rebuild_guard.sql).
-- With `writer`, the table a trigger fired on: nothing is queued unless that table or a
-- table it is a partition of (at any level) is watched under that name or bears it (a
-- stand-in's): a trigger someone else attached to a table of theirs, with any name in
-- its arguments, sweeps nothing.
DROP FUNCTION IF EXISTS cdc_invalidator.queue_sweep_once_v1(text, text, text);
CREATE OR REPLACE FUNCTION cdc_invalidator.queue_sweep_once_v1(
    schema_n text, table_n text, reason text, writer regclass DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $once$
BEGIN
    -- Under SERIALIZABLE that read of the queue takes predicate locks on its newest
    -- index page, where every concurrent writer's rows go: sessions writing new
    -- partitions at once failed each other ("could not serialize access"). There, every
    -- call queues its sweep row; the listener sweeps a batch's patterns once whatever
    -- their number. (A transaction-local marker instead of the read could be set by the
    -- writer itself, and skip its sweep.)
    IF current_setting('transaction_isolation') <> 'serializable' AND EXISTS (
        SELECT FROM cdc_invalidator.queue_v1 q
        WHERE q.xid = pg_current_xact_id() AND q.op = 'T'
          AND q.schema_name = schema_n AND q.table_name = table_n) THEN
        RETURN;
    END IF;
    IF writer IS NOT NULL AND NOT EXISTS (
        -- (the table and the tables it is a partition or an inheritance child of)
        SELECT FROM (SELECT writer::oid AS relid
                     UNION SELECT unnest(cdc_invalidator.ancestors_v1(writer))) up
        JOIN pg_class c ON c.oid = up.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE (n.nspname::text, c.relname::text) = (schema_n, table_n)
           OR EXISTS (SELECT FROM cdc_invalidator.watched_v1 w
                      WHERE w.relid::oid = up.relid
                        AND (w.schema_name, w.table_name) = (schema_n, table_n))) THEN
        RETURN;
    END IF;
    INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row)
    VALUES (schema_n, table_n, 'T', json_build_object('unrenderable', reason));
    IF current_setting('cdc_invalidator.notify', true) IS DISTINCT FROM 'off'
       AND pg_notification_queue_usage() < 0.5 THEN
        PERFORM pg_notify('cdc_invalidator_v1', '');
    END IF;
END
$once$;
REVOKE ALL ON FUNCTION cdc_invalidator.queue_sweep_once_v1(text, text, text, regclass) FROM PUBLIC;

-- note_server_v3(sweep, seen, sweep_crashed): called by the trigger listener at each
-- connect. Another server than the one it last ran on (server_lineage_v1(); install
-- recorded the first) may lack transactions that readers of the old one saw and cached:
-- after a failover with asynchronous replication, a point-in-time recovery, a dump
-- restored elsewhere. The lineage recorded here came with the data, so a primary gone
-- back to after a standby was promoted and used still holds its own: `seen`, the
-- lineage the calling listener's previous session saw (NULL: none), tells that one (an
-- older timeline than it saw; a newer one was noted by the listener that took it while
-- the caller waited). No change will ever come for what is lost, so one sweep of every
-- watched table is queued, {"resync": ...} under the name its events carry, unless
-- `sweep` (sweep_after_failover) is false and the server is a newer timeline of the same
-- system (a promotion, a point-in-time recovery: what synchronous replication may make
-- needless). A database restored from a dump on the same lineage (into another database
-- of this cluster, or over this one: listener_state_v1.recorded_in is not this table), or
-- a copy of another database put in its place (recorded_in_database is not this one)
-- went back to that time: swept whatever the settings, as no replication keeps
-- what it lacks. On the same lineage, a server that came up from a crash since the run
-- recorded (server_run_v1(): another mark; none recorded, a first start: nothing
-- compared) lost the asynchronous commits not yet flushed: swept the same way if
-- `sweep_crashed` (the listener's sweep_after_crash, given where this database's
-- writers commit asynchronously). The listener sweeps it as a TRUNCATE's, saves no position past it
-- until that is done, and replay finds it in the history. Queued in the same
-- transaction as the new lineage, run and table are recorded: nothing in between to lose.
-- Returns the lineage compared with (`seen` where it tells, else the one recorded), this
-- one (NULL: unknown), whether a sweep was queued, the run compared with (this one where
-- another lineage was recorded: not compared) and this one, and whether the row was
-- recorded in another listener_state_v1 or database (a restore, a copy).
-- SECURITY DEFINER: the listener's role may not write the queue (it is granted this
-- function by grant_listener); the caller chooses no more than the two sweeps and which
-- lineage is compared (one shaped as a lineage, or none).
DROP FUNCTION IF EXISTS cdc_invalidator.note_server_v1(boolean, text);
DROP FUNCTION IF EXISTS cdc_invalidator.note_server_v2(boolean, text, boolean);
CREATE OR REPLACE FUNCTION cdc_invalidator.note_server_v3(
    sweep boolean, seen text, sweep_crashed boolean,
    OUT previous text, OUT current text, OUT swept boolean,
    OUT run_before text, OUT run text, OUT restored boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $note$
DECLARE
    recorded text;
    why text;  -- the sweep's reason, if one is queued
BEGIN
    current := cdc_invalidator.server_lineage_v1();
    run := cdc_invalidator.server_run_v1();
    swept := false;
    SELECT s.server_lineage, s.server_run,
           s.recorded_in <> 'cdc_invalidator.listener_state_v1'::regclass
           OR s.recorded_in_database <> cdc_invalidator.database_oid_v1()
    INTO recorded, run_before, restored
    FROM cdc_invalidator.listener_state_v1 s FOR UPDATE;
    restored := coalesce(restored, false);  -- (none recorded: an older release's row)
    previous := recorded;
    IF seen !~ '^[0-9]+ timeline [0-9]+$' THEN
        seen := NULL;  -- (a lineage or nothing: no other text of the caller's is kept)
    END IF;
    IF current IS NULL THEN
        NULL;  -- (the lineage withheld: only the run is compared)
    ELSIF seen IS NOT NULL AND seen <> current
          AND (split_part(seen, ' ', 1) <> split_part(current, ' ', 1)
               OR split_part(seen, ' ', 3)::bigint > split_part(current, ' ', 3)::bigint) THEN
        -- Since the caller's previous session: back to an older timeline (the old
        -- primary, a failover undone), or to another system. What was written there is
        -- not here, whatever the replication was.
        previous := seen;
        why := format('another server: %s, after %s', current, previous);
    ELSIF recorded IS NOT NULL AND recorded <> current THEN
        -- (a caller that saw an older timeline was waiting while another listener took
        -- this one: that one noted it, and recorded = current)
        IF sweep OR split_part(recorded, ' ', 1) <> split_part(current, ' ', 1) THEN
            -- (a sweep that no replication makes needless: sweep_after_failover = false
            -- skips only a newer timeline of the same system)
            why := format('another server: %s, after %s', current, previous);
        END IF;
        -- Another server's run is not compared with this one's: a promoted standby's
        -- starts empty (unlogged tables are not replicated), and the lineage rule above
        -- decided.
        run_before := run;
    END IF;
    IF restored THEN
        -- (whatever the rules above found: the restore says why, and it is swept for
        -- whatever the settings)
        why := 'the database was restored from a dump or copied from another '
               '(cdc_invalidator.listener_state_v1''s row was recorded in another table or '
               'database): it went back to the time of the dump or copy';
    END IF;
    IF why IS NULL AND sweep_crashed AND run <> run_before THEN
        why := format('PostgreSQL crashed since its run noted at %s (this one noted at %s), '
                      'which loses commits made with synchronous_commit = off',
                      to_timestamp(run_before::float8), to_timestamp(run::float8));
    END IF;
    IF why IS NOT NULL THEN
        -- (the name install recorded, else the table's own: a row of an older release)
        INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row)
        SELECT coalesce(w.schema_name, n.nspname), coalesce(w.table_name, c.relname), 'T',
               json_build_object('resync', why)
        FROM cdc_invalidator.watched_v1 w
        JOIN pg_class c ON c.oid = w.relid JOIN pg_namespace n ON n.oid = c.relnamespace;
        swept := true;
    END IF;
    UPDATE cdc_invalidator.listener_state_v1
    SET server_lineage = coalesce(current, server_lineage),
        server_run = coalesce(run, server_run),
        recorded_in = 'cdc_invalidator.listener_state_v1'::regclass,
        recorded_in_database = cdc_invalidator.database_oid_v1();
END
$note$;
REVOKE ALL ON FUNCTION cdc_invalidator.note_server_v3(boolean, text, boolean) FROM PUBLIC;

-- The row trigger a watched partitioned table carries for partitions created or attached
-- after watch(): statement triggers fire only on the table a statement names, so a write
-- naming a new partition would otherwise go unseen until `install` gave it triggers of
-- its own. Partitions that have them have this trigger disabled. A change it sees cannot
-- be rendered here cheaply, so it queues one sweep of the table's templates per
-- transaction (TG_ARGV: the schema and table name the events carry). The rebuild guard's
-- stand-in triggers (rebuild_guard.sql) call it too, for a table that took a watched
-- table's name, or whose capture function was dropped (a third argument: the reason). The rebuild guard's cdc_invalidator_part_trunc_v1, a partition's
-- TRUNCATE trigger, does as well: it sweeps the watched table the partition is in now,
-- the nearest one above it, whatever table its arguments name (it may have been detached
-- and attached to another since). It reads and writes only our catalog and queue: the
-- installing role may own it.
CREATE OR REPLACE FUNCTION cdc_invalidator.sweep_untriggered_v1()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $untriggered$
DECLARE
    schema_n text := TG_ARGV[0];
    table_n  text := TG_ARGV[1];
BEGIN
    IF TG_NAME = 'cdc_invalidator_part_trunc_v1' THEN
        -- (pg_partition_ancestors lists the partition first, then up to the root)
        SELECT w.schema_name, w.table_name INTO schema_n, table_n
        FROM pg_partition_ancestors(TG_RELID) WITH ORDINALITY a (relid, n)
        JOIN cdc_invalidator.watched_v1 w ON w.relid::oid = a.relid
        ORDER BY a.n LIMIT 1;
        IF NOT FOUND THEN
            schema_n := TG_ARGV[0];
            table_n := TG_ARGV[1];
        END IF;
    END IF;
    PERFORM cdc_invalidator.queue_sweep_once_v1(schema_n, table_n, CASE
        WHEN TG_NARGS > 2 THEN format('%s has no capture triggers: %s', TG_RELID::regclass,
                                      TG_ARGV[2])
        WHEN TG_NAME LIKE 'cdc\_invalidator\_stand\_in%' THEN format(
            '%s has no capture triggers: it, or the table it is a partition of, took the '
            'name of watched table %I.%I after install', TG_RELID::regclass, TG_ARGV[0], TG_ARGV[1])
        ELSE format('partition %s has no capture triggers (created or attached after install)',
                    TG_RELID::regclass) END, TG_RELID);
    RETURN NULL;
END
$untriggered$;

-- regrant_sweeps_v1(role): EXECUTE on sweep_untriggered_v1() for `role` exactly while it
-- owns a partitioned table carrying a row trigger of ours (a watched one's
-- cdc_invalidator_part_v1, a stand-in's, or a copy of either on a partitioned partition):
-- PostgreSQL checks that privilege as the role creating or attaching a partition, when
-- it copies the trigger onto it, so without it the owner could not add one. Called
-- wherever such triggers or owners change; it changes the function's privileges only
-- when they differ (install runs it for every watched table, every time).
CREATE OR REPLACE FUNCTION cdc_invalidator.regrant_sweeps_v1(role regrole)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $regrant$
DECLARE
    needs   boolean := EXISTS (
        SELECT FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
        WHERE c.relowner = role AND c.relkind = 'p'
          AND tg.tgname IN ('cdc_invalidator_part_v1', 'cdc_invalidator_stand_in_row_v1'));
    granted boolean := EXISTS (
        SELECT FROM pg_proc p, aclexplode(p.proacl) a
        WHERE p.oid = 'cdc_invalidator.sweep_untriggered_v1()'::regprocedure
          AND a.grantee = role AND a.privilege_type = 'EXECUTE');
BEGIN
    IF role = (SELECT nspowner FROM pg_namespace WHERE nspname = 'cdc_invalidator')
       OR needs = granted THEN
        RETURN;
    END IF;
    EXECUTE format('%s EXECUTE ON FUNCTION cdc_invalidator.sweep_untriggered_v1() %s %s',
                   CASE WHEN needs THEN 'GRANT' ELSE 'REVOKE' END,
                   CASE WHEN needs THEN 'TO' ELSE 'FROM' END, role);
END
$regrant$;
REVOKE ALL ON FUNCTION cdc_invalidator.regrant_sweeps_v1(regrole) FROM PUBLIC;

-- capture_off_v1: the tables bearing capture triggers of ours that did not all fire
-- ALWAYS (DISABLE TRIGGER, ENABLE REPLICA TRIGGER, or ENABLE TRIGGER: then not in a
-- session_replication_role = replica session) after a command, with their states
-- (trigger_states_v1(), below). What was written while they were off was not captured,
-- and which rows that was is not known: the next command that changes the state (the
-- rebuild guard, rebuild_guard.sql: ENABLE TRIGGER ALL, as `pg_restore
-- --disable-triggers` ends its COPY) or install (watch()) queues one sweep
-- of the table's templates in its transaction. Only the role that installed writes it.
CREATE TABLE IF NOT EXISTS cdc_invalidator.capture_off_v1 (
    relid oid PRIMARY KEY,
    state text NOT NULL
);
REVOKE ALL ON TABLE cdc_invalidator.capture_off_v1 FROM PUBLIC;
DELETE FROM cdc_invalidator.capture_off_v1 o  -- (of tables dropped since)
WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = o.relid);

-- has_capture_v1(rel): whether `rel` bears the four statement triggers of ours that
-- install gives a watched table, and each of its partitions and inheritance children.
CREATE OR REPLACE FUNCTION cdc_invalidator.has_capture_v1(rel oid)
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $has_capture$
    SELECT count(*) = 4 FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
    WHERE tg.tgrelid = rel AND p.pronamespace = 'cdc_invalidator'::regnamespace
      AND tg.tgname IN ('cdc_invalidator_ins_v1', 'cdc_invalidator_upd_v1',
                        'cdc_invalidator_del_v1', 'cdc_invalidator_trunc_v1')
$has_capture$;
REVOKE ALL ON FUNCTION cdc_invalidator.has_capture_v1(oid) FROM PUBLIC;

-- trigger_states_v1(rel): the states (tgenabled) of the triggers of ours that capture
-- `rel`'s writes, in the order of their names ('A's where all fire ALWAYS, NULL where
-- there are none): its statement triggers, a partition's TRUNCATE trigger, a stand-in's
-- (rebuild_guard.sql), a partitioned table's row trigger, and a partition's copy of that
-- where the partition lacks statement triggers of ours (made since install: the copy is
-- what captures its rows; elsewhere install keeps it off). A '-' for each trigger
-- missing where install gave it (DROP TRIGGER, or CREATE OR REPLACE TRIGGER of our name
-- with another function): each of the four statement triggers on a watched table, or
-- beside others of the four; the row trigger of a watched partitioned table. What it
-- captured was not, as while off. Not beside a stand-in, which sweeps every transaction
-- that writes the table. watch() and the rebuild guard.
CREATE OR REPLACE FUNCTION cdc_invalidator.trigger_states_v1(rel oid)
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $capture_state$
    WITH ours AS (
        SELECT tg.tgname, tg.tgenabled,
               tg.tgname IN ('cdc_invalidator_ins_v1', 'cdc_invalidator_upd_v1',
                             'cdc_invalidator_del_v1', 'cdc_invalidator_trunc_v1') AS four
        FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE tg.tgrelid = rel AND p.pronamespace = 'cdc_invalidator'::regnamespace
          AND tg.tgname IN ('cdc_invalidator_ins_v1', 'cdc_invalidator_upd_v1',
                            'cdc_invalidator_del_v1', 'cdc_invalidator_trunc_v1',
                            'cdc_invalidator_part_trunc_v1', 'cdc_invalidator_stand_in_v1',
                            'cdc_invalidator_stand_in_row_v1', 'cdc_invalidator_part_v1')
    ), n AS (
        SELECT count(*) FILTER (WHERE o.four) AS four,
               count(*) FILTER (WHERE o.tgname LIKE 'cdc\_invalidator\_stand\_in%') AS stand_ins,
               count(*) FILTER (WHERE o.tgname = 'cdc_invalidator_part_v1') AS part,
               EXISTS (SELECT FROM cdc_invalidator.watched_v1 w WHERE w.relid::oid = rel) AS watched,
               (SELECT c.relkind FROM pg_class c WHERE c.oid = rel) AS kind
        FROM ours o
    )
    SELECT CASE WHEN n.stand_ins > 0 THEN s.states
                ELSE nullif(coalesce(s.states, '')
                            || CASE WHEN n.four BETWEEN 1 AND 3 OR (n.four = 0 AND n.watched)
                                    THEN repeat('-', 4 - n.four::int) ELSE '' END
                            -- (the partitioned table's own: dropped, it goes from every
                            -- partition, and a partition made since captured nothing)
                            || CASE WHEN n.kind = 'p' AND n.watched AND n.part = 0
                                    THEN '-' ELSE '' END, '') END
    FROM n, LATERAL (
        SELECT string_agg(o.tgenabled::text, '' ORDER BY o.tgname) AS states FROM ours o
        WHERE o.tgname <> 'cdc_invalidator_part_v1' OR n.kind = 'p' OR n.four < 4) s
$capture_state$;
REVOKE ALL ON FUNCTION cdc_invalidator.trigger_states_v1(oid) FROM PUBLIC;

-- lock_tables_v1(targets, mode): LOCK TABLE each of `targets` ('ONLY name' for the
-- table alone, a name for it and its partitions or children) IN `mode` MODE, one by one
-- in the order given, their waits bounded all together, from the first lock held, by
-- the bound lock_wait.sql set for one wait: each LOCK gets what is left (at least 1 ms),
-- and the bound is set back after. Bounded one by one, the waits added up: a writer
-- queued behind the first lock while the script waited for the next ones, each a little
-- under the bound, was aborted by its deadlock check (deadlock_timeout after it began to
-- wait) once the script waited for a table that writer held. A test's writers were, in
-- logical mode and in trigger mode (tests/test_mapping_changes.py). Install then gives
-- up first, rolls back and tries again. Logical mode's publish(), trigger mode's
-- lock_for_watch_v1().
CREATE OR REPLACE FUNCTION cdc_invalidator.lock_tables_v1(targets text[], mode text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $lock_tables$
DECLARE
    bound text := current_setting('lock_timeout');
    first_held timestamptz;
    target text;
BEGIN
    IF upper(mode) NOT IN ('ACCESS SHARE', 'ROW SHARE', 'ROW EXCLUSIVE', 'SHARE UPDATE EXCLUSIVE',
                           'SHARE', 'SHARE ROW EXCLUSIVE', 'EXCLUSIVE', 'ACCESS EXCLUSIVE') THEN
        RAISE EXCEPTION 'cdc_invalidator.lock_tables_v1: % is not a lock mode', mode
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH target IN ARRAY coalesce(targets, '{}') LOOP
        IF first_held IS NOT NULL AND bound::interval > interval '0' THEN
            PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                bound::interval - (clock_timestamp() - first_held)) * 1000))::text || 'ms',
                true);
        END IF;
        EXECUTE format('LOCK TABLE %s IN %s MODE', target, mode);
        first_held := coalesce(first_held, clock_timestamp());
    END LOOP;
    PERFORM set_config('lock_timeout', bound, true);
END
$lock_tables$;
REVOKE ALL ON FUNCTION cdc_invalidator.lock_tables_v1(text[], text) FROM PUBLIC;

-- statement_triggers_v1(rel, fn): the four statement triggers that run capture function
-- `fn` (its name, schema-qualified) on `rel`, firing ALWAYS: for a watched table, and
-- for each of its partitions and inheritance children (watch(), and the rebuild guard
-- for a child made later). A trigger of our name that calls another function is not
-- ours (or another watched table's, which a child that moved kept): replaced. Only
-- missing triggers are created, and only triggers not firing ALWAYS are altered, so
-- running it again takes no table lock beyond what replacing the function needs.
CREATE OR REPLACE FUNCTION cdc_invalidator.statement_triggers_v1(rel regclass, fn text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $statement_triggers$
DECLARE
    trg record;
BEGIN
    FOR trg IN
        SELECT * FROM (VALUES
            ('cdc_invalidator_ins_v1', 'INSERT', 'REFERENCING NEW TABLE AS new_rows'),
            ('cdc_invalidator_upd_v1', 'UPDATE',
             'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'),
            ('cdc_invalidator_del_v1', 'DELETE', 'REFERENCING OLD TABLE AS old_rows'),
            ('cdc_invalidator_trunc_v1', 'TRUNCATE', '')
        ) AS t (name, event, referencing)
    LOOP
        IF EXISTS (SELECT FROM pg_trigger WHERE tgrelid = rel AND tgname = trg.name
                   AND tgfoid <> (fn || '()')::regprocedure) THEN
            EXECUTE format('DROP TRIGGER %I ON %s', trg.name, rel);
        END IF;
        IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = rel AND tgname = trg.name) THEN
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                           trg.name, trg.event, rel, trg.referencing, fn);
        END IF;
        IF (SELECT tgenabled FROM pg_trigger WHERE tgrelid = rel AND tgname = trg.name) <> 'A' THEN
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', rel, trg.name);
        END IF;
    END LOOP;
END
$statement_triggers$;
REVOKE ALL ON FUNCTION cdc_invalidator.statement_triggers_v1(regclass, text) FROM PUBLIC;

-- lock_for_watch_v1(tables): before install's watch() calls, the lock CREATE TRIGGER
-- and ENABLE ALWAYS TRIGGER take (SHARE ROW EXCLUSIVE: every write waits, no read), on
-- each table, partition and inheritance child of `tables` whose triggers watch() will
-- make or alter: one of the four statement triggers missing (a partition made since
-- install has only the copies of the partitioned table's), or one of ours missing or
-- not firing ALWAYS (trigger_states_v1()). Taken all here, their waits bounded all
-- together (lock_tables_v1()), not one by one as watch() reaches each after the work on
-- those before it. Each alone (ONLY): the rest of its tree, whose triggers are in
-- place, is not locked, nor is a table whose triggers are all there (install run again
-- waits for no writer); nor one whose owner the installer cannot act for, which
-- watch() refuses with its own message (LOCK TABLE refused it with a bare "permission
-- denied"). What watch() does besides (a row trigger made again under a table's new
-- name, a copy of it turned off, a stand-in dropped, a trigger of our name calling
-- another function replaced) still waits on its own, bounded one by one.
CREATE OR REPLACE FUNCTION cdc_invalidator.lock_for_watch_v1(tables regclass[])
RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $lock_for_watch$
    WITH tree AS (
        SELECT r.rel
        FROM pg_class c, LATERAL (
            SELECT c.oid AS rel
            UNION SELECT p.relid FROM pg_partition_tree(c.oid) p
            UNION SELECT unnest(cdc_invalidator.heirs_v1(c.oid, ARRAY(
                SELECT w.relid::oid FROM cdc_invalidator.watched_v1 w
                WHERE w.relid::oid <> c.oid)))) r
        WHERE c.oid = ANY (tables::oid[]) AND c.relkind IN ('r', 'p')
    )
    SELECT cdc_invalidator.lock_tables_v1(ARRAY(
        SELECT 'ONLY ' || c.oid::regclass::text
        FROM pg_class c
        WHERE c.oid IN (SELECT t.rel FROM tree t) AND c.relkind IN ('r', 'p')
          AND pg_has_role(current_user, c.relowner, 'MEMBER')
          AND (coalesce(cdc_invalidator.trigger_states_v1(c.oid), '-') ~ '[^A]'
               OR (SELECT count(*) FROM pg_trigger tg
                   WHERE tg.tgrelid = c.oid
                     AND tg.tgname IN ('cdc_invalidator_ins_v1', 'cdc_invalidator_upd_v1',
                                       'cdc_invalidator_del_v1', 'cdc_invalidator_trunc_v1')) < 4)
        ORDER BY c.oid), 'SHARE ROW EXCLUSIVE')
$lock_for_watch$;
REVOKE ALL ON FUNCTION cdc_invalidator.lock_for_watch_v1(regclass[]) FROM PUBLIC;

-- watch(table, columns[, judge, filter_columns[, notify_payload]]): capture every
-- committed change of `table`, copying `columns`. With a column filter (judge 'ignore':
-- every column counts but `filter_columns`; 'columns': only they count; `columns` count
-- in both), an UPDATE queues only the rows in which a counted column changed
-- (queue_judged_update_v1), provided the table has a primary key to pair old and new
-- rows by; without one every UPDATE is queued, as without a filter.
-- It (re)generates one trigger function for the table, with the column list compiled
-- in (no dynamic SQL per row), and attaches four statement-level triggers. INSERT,
-- UPDATE and DELETE read transition tables, so a statement that touches 100k rows runs
-- one INSERT ... SELECT into the queue instead of 100k trigger calls. TRUNCATE fires
-- no row triggers at all: its own trigger queues one event for the whole table.
-- Calling it again with other columns replaces the function; the triggers stay.
-- With notify_payload, a statement that changed one row sends that row in its NOTIFY
-- payload (queue_early_v1); off by default, since any role that can connect may LISTEN
-- and so read the key columns of every such change. Off, the function is as it was
-- before the payload existed: the empty wake-up only, nothing more per write.
-- With bulk_sweep_rows (N), a statement that changed at least N rows queues one sweep
-- of the table's templates (queue_bulk_sweep_v1) instead of its packs: the writer no
-- longer reads its transition table beyond counting N rows, and the table's cached keys
-- all go (a cold cache instead of a slow write; a filtered table's UPDATEs are still
-- judged row by row). Off (NULL) by default; off, the function is as it was before.
--
-- What keeps writes safe and changes seen while the schema changes under it:
--  * Every trigger fires ALWAYS, so writes applied with session_replication_role =
--    replica (logical-replication subscribers, some loaders) are captured too.
--  * The capture function first checks that the compiled column names still exist (a
--    query that cannot run if they do not, in a block that catches just that). This
--    block is a read-only subtransaction: it never takes a transaction id, so it adds
--    nothing to the 64-entry subtransaction cache whose overflow slows the server.
--    When they are gone, queue_drifted_v1 finds the columns by attnum (a rename) or
--    queues a sweep (a dropped column): a migration never makes a write fail.
--  * The settings that change how values print (TimeZone, DateStyle, IntervalStyle,
--    extra_float_digits) are pinned only when a rendered column's type needs them
--    (prints_alike_v1): a SET clause costs every call. Without them, the same check
--    also fails once such a column is retyped to a type that needs them, and the
--    statement then queues a sweep until `install` pins them (queue_drifted_unpinned_v1).
--  * The capture function belongs to the table's owner (SECURITY DEFINER as that role):
--    converting a column to text can run code the table's owner chose (a type's output
--    function or cast), and it must never run with the installer's rights. The owner is
--    granted INSERT on the queue's event columns, nothing else.
--  * A partitioned table also carries a row trigger, cloned by PostgreSQL onto every
--    partition created or attached later, which sweeps until `install` runs again.
-- SECURITY DEFINER (owner: the installing role) so that it may create triggers and hand
-- the function to the table's owner; the pinned search_path and format('%I'/'%L') keep
-- table and column names from ever running as SQL.
-- missing_columns(table, columns): those of `columns` the table does not have (as the
-- catalog names them), quoted and comma-separated, or NULL: what watch() and
-- record_filter() refuse, naming them.
CREATE OR REPLACE FUNCTION cdc_invalidator.missing_columns(tbl regclass, cols text[])
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $missing$
    SELECT string_agg(quote_ident(c), ', ')
    FROM unnest(cols) c
    WHERE NOT EXISTS (
        SELECT FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
$missing$;

-- The two-, four- and five-argument watch() of earlier releases: replaced by this one (same
-- calls; CREATE OR REPLACE cannot add a parameter, and the old one would stay beside it).
DROP FUNCTION IF EXISTS cdc_invalidator.watch(regclass, text[]);
DROP FUNCTION IF EXISTS cdc_invalidator.watch(regclass, text[], text, text[]);
DROP FUNCTION IF EXISTS cdc_invalidator.watch(regclass, text[], text, text[], boolean);
CREATE OR REPLACE FUNCTION cdc_invalidator.watch(
    tbl regclass, key_columns text[], judge text DEFAULT NULL, filter_columns text[] DEFAULT NULL,
    notify_payload boolean DEFAULT false, bulk_sweep_rows integer DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $watch$
DECLARE
    fn       text := format('cdc_invalidator.%I', 'capture_' || tbl::oid || '_v1');
    missing  text;
    virtual  text;
    unpinned text;
    kind     "char";
    owner    regrole;
    schema_n name;
    table_n  name;
    names    text;
    attnums  int2[];
    probe    text;
    rendered text[];
    pinned   boolean;
    bytes    boolean;
    idents   boolean;
    body     text;
    pk       text[];
    counted  text[];
    judged   boolean := false;
    natts    int2;
    judged_q text;
    update_q text;  -- a one-row UPDATE's queue INSERT, without a filter
    early_q  text;  -- the UPDATE of one row: queued, judged if filtered, and its payload
    packed_q text;  -- the UPDATE of several rows: packs
    early_head text;
    off      boolean := false;  -- a capture trigger of ours was found not firing ALWAYS
    single_q text[];  -- a one-row INSERT, UPDATE, DELETE: queued (with the payload if on)
    single_end text;  -- after it: RETURN when it sent its own payload, not the wake-up
    many_q   text[];  -- several rows' INSERT, UPDATE, DELETE: packs, or a bulk sweep
    count_q  text[];  -- the count of rows: INTO what, up to how many, then, declared
    rel      regclass;
    trg      record;
BEGIN
    SELECT c.relkind, c.relowner, n.nspname, c.relname INTO kind, owner, schema_n, table_n
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF bulk_sweep_rows < 1000 THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: bulk_sweep_rows must be at least 1000, not %', bulk_sweep_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: % is not a table', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT pg_has_role(current_user, owner, 'MEMBER') THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: table % belongs to role %, and role % is not a member of it', tbl, owner, current_user
            USING HINT = 'Run install as the owner of the watched tables, a role that is a member of their owners, or a superuser: each table''s capture function must belong to its owner.',
                  ERRCODE = 'insufficient_privilege';
    END IF;
    -- The capture function runs as the table's owner and calls these on every write:
    -- PUBLIC may by default; where a hardened server took that away, every write to the
    -- table would fail. Refused here instead.
    missing := (
        SELECT string_agg(f, ', ') FROM unnest(ARRAY[
            'pg_catalog.pg_notify(text, text)',
            'pg_catalog.pg_try_advisory_lock_shared(integer, integer)',
            'pg_catalog.pg_advisory_unlock_shared(integer, integer)',
            'pg_catalog.pg_try_advisory_xact_lock_shared(integer, integer)']) f
        WHERE NOT has_function_privilege(owner, f, 'EXECUTE'));
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: role %, the owner of table %, may not run %, which its capture function calls (on every write, or while the listener is busy)', owner, tbl, missing
            USING HINT = format('PostgreSQL lets PUBLIC run them by default: GRANT EXECUTE ON FUNCTION %s TO %s', missing, owner),
                  ERRCODE = 'insufficient_privilege';
    END IF;
    key_columns := ARRAY(SELECT DISTINCT c FROM unnest(coalesce(key_columns, '{}')) c ORDER BY c);
    missing := cdc_invalidator.missing_columns(tbl, key_columns);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: table % has no column %', tbl, missing
            USING ERRCODE = 'undefined_column';
    END IF;
    IF judge IS NOT NULL AND judge NOT IN ('ignore', 'columns') THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: judge must be ''ignore'' or ''columns'', not %', judge
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    filter_columns := CASE WHEN judge IS NOT NULL THEN coalesce(filter_columns, '{}') END;
    missing := cdc_invalidator.missing_columns(tbl, filter_columns);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: table % has no column % (listed in %)', tbl,
            missing, CASE judge WHEN 'ignore' THEN 'ignore_columns' ELSE 'columns' END
            USING ERRCODE = 'undefined_column';
    END IF;
    -- A virtual generated column (PostgreSQL 18) is computed when read, and a trigger's
    -- transition tables do not compute it (18.6: read as NULL, never changed): a key
    -- built from one would never be deleted, a change counted by one never seen.
    virtual := (
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = 'v'
          AND (a.attname = ANY (key_columns)
               OR (judge = 'columns' AND a.attname = ANY (filter_columns))));
    IF virtual IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: column % of table % is a virtual generated column, which a trigger cannot read (PostgreSQL does not compute it in transition tables)', virtual, tbl
            USING HINT = 'Use the columns it is computed from in the templates (or the column filter), or make it a STORED generated column.',
                  ERRCODE = 'feature_not_supported';
    END IF;
    -- The primary key pairs old and new rows; a table without one is not judged.
    pk := ARRAY(
        SELECT a.attname::text
        FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k (n, ord)
        JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.n
        WHERE i.indrelid = tbl AND i.indisprimary ORDER BY k.ord);
    IF judge IS NOT NULL AND cardinality(pk) > 0 THEN
        judged := true;
        counted := ARRAY(
            SELECT a.attname::text FROM pg_attribute a
            WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
              -- Not a virtual generated column (unreadable here, see above): its change
              -- is one of the columns it is computed from.
              AND a.attgenerated <> 'v'
              AND (a.attname = ANY (key_columns)
                   OR (a.attname = ANY (filter_columns)) = (judge = 'columns'))
            -- Fixed-size values first: a change found there decides before any large
            -- value is read.
            ORDER BY a.attlen < 0, a.attnum);
        IF judge = 'ignore' THEN
            SELECT c.relnatts INTO natts FROM pg_class c WHERE c.oid = tbl;
        END IF;
    END IF;
    attnums := ARRAY(
        SELECT a.attnum FROM unnest(key_columns) WITH ORDINALITY AS k (c, i)
        JOIN pg_attribute a ON a.attrelid = tbl AND a.attname = k.c ORDER BY k.i);
    -- The watched table's own schema and name, compiled in: a write that names one of
    -- its partitions is still a change of the table the configuration knows, and so is
    -- a write after the table was renamed (check reports that the configuration drifted).
    names := format('%L, %L', schema_n, table_n);
    -- The NOTIFY payload of a statement that changed one row starts so (queue_early_v1
    -- says the rest): {"s": schema, "t": table, "x": xid, "a": the writer's now() (Unix
    -- time), "r": [[op, old_row, new_row]]}, the names as the queue rows carry them.
    early_head := format('{"s":%s,"t":%s,"x":', to_json(schema_n::text), to_json(table_n::text));
    update_q := cdc_invalidator.queue_statement_v1('UPDATE ONE', names, key_columns, key_columns);
    early_q := CASE WHEN notify_payload THEN cdc_invalidator.queue_early_v1(update_q, early_head)
                    ELSE update_q END;
    packed_q := cdc_invalidator.queue_packed_v1('UPDATE', names, key_columns, key_columns);
    IF kind = 'p' THEN
        -- An UPDATE through a partitioned table can have fewer new rows than old: a row
        -- moved to a partition whose BEFORE INSERT trigger returns NULL is deleted and
        -- inserted nowhere. Old and new packs paired by number would then disagree in
        -- size (dead letters) or leave the last old packs without a partner (never
        -- queued). So the rows are counted, and a statement whose sides differ is
        -- queued as INSERT packs of its new rows and DELETE packs of its old rows, which
        -- delete every key of both (the DELETEs last: they are never empty, so FOUND
        -- sends the wake-up). A plain table's UPDATE always has as many new rows as old
        -- and is not counted: its writers pay nothing for this.
        packed_q := format(
            'IF (SELECT count(*) FROM old_rows) = (SELECT count(*) FROM new_rows) THEN %s; '
            'ELSE %s; %s; END IF',
            packed_q,
            cdc_invalidator.queue_packed_v1('INSERT', names, key_columns, key_columns),
            cdc_invalidator.queue_packed_v1('DELETE', names, key_columns, key_columns));
    END IF;
    IF judged THEN
        -- Planned here, on the table itself, so that a write never meets a statement
        -- PostgreSQL cannot plan (a FULL JOIN needs a primary key type whose equality
        -- can merge or hash): such a table is not judged.
        judged_q := cdc_invalidator.queue_judged_update_v1(names, key_columns, key_columns, pk, counted);
        BEGIN
            EXECUTE 'EXPLAIN ' || replace(replace(judged_q,
                'FROM old_rows r', format('FROM %s r', tbl)), 'FROM new_rows r', format('FROM %s r', tbl));
            EXECUTE 'EXPLAIN ' || replace(replace(
                cdc_invalidator.queue_judged_packed_v1(names, key_columns, key_columns, pk, counted),
                'FROM old_rows r', format('FROM %s r', tbl)), 'FROM new_rows r', format('FROM %s r', tbl));
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'cdc_invalidator.watch: the UPDATEs of % cannot be judged (%): every UPDATE is queued', tbl, SQLERRM;
            judged := false;
            natts := NULL;
        END;
    END IF;
    IF judged THEN
        early_q := format(CASE WHEN natts IS NULL THEN '%s' ELSE
            -- ignore_columns: a column added since watch() would be judged by nobody.
            'IF (SELECT c.relnatts FROM pg_class c WHERE c.oid = %3$s) = %4$s THEN %1$s; '
            'ELSE %2$s; END IF' END,
            CASE WHEN notify_payload THEN cdc_invalidator.queue_early_v1(judged_q, early_head)
                 ELSE judged_q END,
            early_q, tbl::oid, natts);
        packed_q := format(CASE WHEN natts IS NULL THEN '%s' ELSE
            'IF (SELECT c.relnatts FROM pg_class c WHERE c.oid = %3$s) = %4$s THEN %1$s; '
            'ELSE %2$s; END IF' END,
            cdc_invalidator.queue_judged_packed_v1(names, key_columns, key_columns, pk, counted),
            packed_q, tbl::oid, natts);
    END IF;

    -- The columns whose text the function uses: it renders the key columns, and the
    -- filter compares the counted ones as text (extra_float_digits = 0 prints two close
    -- floats alike, which would hide a change). Unless all of them print alike in every
    -- session, the function pins the settings that change how values print.
    rendered := key_columns || CASE WHEN judged THEN counted ELSE '{}' END;
    -- A rendered column whose type (or a domain's base type) is cast to text by a
    -- function of the database's own runs that function inside the capture function,
    -- whose search_path is pg_catalog, pg_temp: a SQL or PL function that sets no
    -- search_path of its own and names an object without its schema (`mood_label($1)`
    -- in public) fails there, and so did every write to the table ("function
    -- mood_label(mood) does not exist"). Refused, naming the function to pin.
    unpinned := (
        SELECT string_agg(format('%I (of type %s, which %s casts to text)', a.attname,
                                 format_type(a.atttypid, a.atttypmod), p.oid::regprocedure),
                          ', ' ORDER BY a.attnum)
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
        WHERE a.attrelid = tbl AND a.attname = ANY (rendered) AND a.attnum > 0
          AND NOT a.attisdropped
          AND p.pronamespace <> 'pg_catalog'::regnamespace
          AND l.lanname NOT IN ('c', 'internal')
          AND NOT EXISTS (SELECT FROM unnest(p.proconfig) g WHERE g LIKE 'search_path=%'));
    IF unpinned IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator.watch: table % has columns % that the capture function converts to text with search_path = pg_catalog, pg_temp, where a function that sets no search_path of its own may not find what it names, and every write to the table would fail', tbl, unpinned
            USING HINT = 'Give the cast''s function its own search_path (ALTER FUNCTION ... SET search_path = ...), or key the templates on another column.',
                  ERRCODE = 'feature_not_supported';
    END IF;
    pinned := EXISTS (
        SELECT FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attname = ANY (rendered) AND a.attnum > 0
          AND NOT a.attisdropped AND NOT cdc_invalidator.prints_alike_v1(a.atttypid));
    -- (bytea_output too, when one may hold a bytea: one SET clause more, about 0.5-1 us
    -- a statement, left out for the dates, times and floats that are most of them)
    bytes := pinned AND EXISTS (
        SELECT FROM pg_attribute a
        WHERE a.attrelid = tbl AND a.attname = ANY (rendered) AND a.attnum > 0
          AND NOT a.attisdropped AND cdc_invalidator.prints_bytea_v1(a.atttypid));
    -- (quote_all_identifiers off too, when one is a reg* value or an array of them, or a
    -- domain over either: quote_all_identifiers on, a writer's session printed
    -- regclass `public.users` as `"public"."users"`, which no app caches under and logical
    -- mode's walsender, pinned off, never prints)
    idents := pinned AND EXISTS (
        WITH RECURSIVE chain (oid, typtype, typbasetype, typelem) AS (
            SELECT t.oid, t.typtype, t.typbasetype, t.typelem
            FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
            WHERE a.attrelid = tbl AND a.attname = ANY (rendered) AND a.attnum > 0
              AND NOT a.attisdropped
            UNION ALL
            SELECT t.oid, t.typtype, t.typbasetype, t.typelem
            FROM chain c JOIN pg_type t ON t.oid = c.typbasetype
            WHERE c.typtype = 'd')
        SELECT FROM chain c
        WHERE ARRAY[c.oid, c.typelem] && ARRAY['regclass'::regtype, 'regproc'::regtype,
              'regprocedure'::regtype, 'regoper'::regtype, 'regoperator'::regtype,
              'regtype'::regtype, 'regconfig'::regtype, 'regdictionary'::regtype,
              'regnamespace'::regtype, 'regrole'::regtype, 'regcollation'::regtype]::oid[]);
    -- false AND (r.a IS NULL AND r.b IS NULL): planned, so it fails on a missing column,
    -- and never run. The statement that plans it counts the transition table's rows up to
    -- two (NOT of the probe is constant true): a single row is queued as one change, as
    -- before packs existed (no aggregation to pay for), several rows in packs.
    -- A judged table's probe names the primary key and counted columns too: once one is
    -- renamed or dropped, the table is not judged (queue_drifted_v1: every UPDATE).
    -- Without pinned settings, the probe passes each rendered column to
    -- prints_alike_probe_v1(), which has no overload for a type that needs them: once one
    -- is retyped to such a type, the probe fails too (queue_drifted_unpinned_v1). Pinned
    -- without bytea_output, it passes each key column to prints_plain_probe_v1(), which
    -- has none for a type that may hold a bytea (queue_drifted_no_bytea_v1). Planned once
    -- per session, never run: the writes pay nothing for it.
    probe := 'false AND (' || coalesce((
        SELECT string_agg(format(CASE WHEN NOT pinned AND c = ANY (rendered)
                                      THEN 'cdc_invalidator.prints_alike_probe_v1(r.%I)'
                                      WHEN pinned AND NOT bytes AND c = ANY (key_columns)
                                      THEN 'cdc_invalidator.prints_plain_probe_v1(r.%I)'
                                      ELSE 'r.%I IS NULL' END, c), ' AND ' ORDER BY c)
        FROM (SELECT DISTINCT c FROM unnest(rendered
                  || CASE WHEN judged THEN pk ELSE '{}' END) c) d),
        'true') || ')';

    -- One row (or none) is queued as one change; with notify_payload it is also sent to
    -- the listener in its own NOTIFY payload (queue_early_v1) instead of the wake-up: it
    -- deletes the keys at once, and the queue read that follows acknowledges the row
    -- without deleting them again. Several rows: packs, and the wake-up. Without
    -- notify_payload the function is exactly what it was before payloads existed.
    single_q := ARRAY[
        cdc_invalidator.queue_statement_v1('INSERT', names, key_columns, key_columns),
        early_q,
        cdc_invalidator.queue_statement_v1('DELETE', names, key_columns, key_columns)];
    IF notify_payload THEN
        single_q[1] := cdc_invalidator.queue_early_v1(single_q[1], early_head);
        single_q[3] := cdc_invalidator.queue_early_v1(single_q[3], early_head);
    END IF;
    single_end := CASE WHEN notify_payload THEN ' RETURN NULL;' ELSE '' END;
    -- Several rows: packs. With bulk_sweep_rows, a statement of that many rows or more
    -- queues one sweep instead: the count that tells one row from several counts up to
    -- that many (once, for every statement of several rows), and that is all it reads of
    -- the transition table. A judged UPDATE is still judged: a filter exists so that rows
    -- whose counted columns did not change invalidate nothing. Off, the count stops at
    -- two and the function is as it was before the setting existed.
    many_q := ARRAY[
        cdc_invalidator.queue_packed_v1('INSERT', names, key_columns, key_columns),
        packed_q,
        cdc_invalidator.queue_packed_v1('DELETE', names, key_columns, key_columns)];
    -- Up to one_pack_rows_v1() rows: one pack, and the packs above only past that. (A
    -- judged UPDATE is left as it is: its rows are paired and judged one by one.)
    FOR i IN 1..3 LOOP
        CONTINUE WHEN i = 2 AND judged;
        many_q[i] := cdc_invalidator.queue_one_pack_v1(
            (ARRAY['INSERT', 'UPDATE', 'DELETE'])[i], names, key_columns, key_columns, many_q[i]);
    END LOOP;
    count_q := ARRAY['count(*) > 1 INTO many', '2', '', ''];
    IF bulk_sweep_rows IS NOT NULL THEN
        count_q := ARRAY['count(*) INTO statement_rows', bulk_sweep_rows::text,
                         ' many := statement_rows > 1;', E'\n            statement_rows bigint;'];
        FOR i IN 1..3 LOOP
            CONTINUE WHEN i = 2 AND judged;
            -- (check_watch.sql reads the number back from this text.)
            many_q[i] := format('IF statement_rows >= %s THEN %s; ELSE %s; END IF', bulk_sweep_rows,
                                cdc_invalidator.queue_bulk_sweep_v1(names, bulk_sweep_rows), many_q[i]);
        END LOOP;
    END IF;
    body := format($body$
        DECLARE
            renamed boolean := false;
            many    boolean;
            queued  bigint;
            old_pack json;
            new_pack json;
            old_n   bigint;
            new_n   bigint;
            old_w   bigint;
            new_w   bigint;%18$s
        BEGIN
            IF TG_OP <> 'TRUNCATE' THEN
                BEGIN
                    IF TG_OP = 'INSERT' THEN
                        SELECT %15$s FROM (SELECT FROM new_rows r WHERE NOT (%3$s) LIMIT %16$s) s;%17$s
                    ELSE
                        SELECT %15$s FROM (SELECT FROM old_rows r WHERE NOT (%3$s) LIMIT %16$s) s;%17$s
                    END IF;
                EXCEPTION WHEN undefined_column OR undefined_function OR ambiguous_function THEN
                    renamed := true;
                END;
            END IF;
            IF renamed THEN
                EXECUTE cdc_invalidator.%10$I(%4$s, %5$L, %6$L, TG_OP, %7$L);
                GET DIAGNOSTICS queued = ROW_COUNT;
                IF queued > 0 AND current_setting('cdc_invalidator.notify', true) IS DISTINCT FROM 'off' THEN
                    %19$s;
                END IF;
                RETURN NULL;
            ELSIF TG_OP = 'INSERT' THEN
                IF many THEN %11$s; ELSE %1$s;%14$s END IF;
            ELSIF TG_OP = 'UPDATE' THEN
                IF many THEN %12$s; ELSE %2$s;%14$s END IF;
            ELSIF TG_OP = 'DELETE' THEN
                IF many THEN %13$s; ELSE %8$s;%14$s END IF;
            ELSE
                %9$s;
            END IF;
            -- A wake-up only: the queue row is the record. Identical notifications
            -- in one transaction fold into one, delivered at commit; none while the
            -- listener is busy (wake_up_v1). Not in a session that set
            -- cdc_invalidator.notify = off: PostgreSQL refuses to PREPARE a transaction
            -- that sent a NOTIFY (two-phase commit); the listener's poll finds its rows.
            IF FOUND AND current_setting('cdc_invalidator.notify', true) IS DISTINCT FROM 'off' THEN
                %19$s;
            END IF;
            RETURN NULL;
        END
    $body$,
        single_q[1],
        single_q[2],
        probe, tbl::oid, key_columns, attnums, names,
        single_q[3],
        cdc_invalidator.queue_statement_v1('TRUNCATE', names, key_columns, key_columns),
        CASE WHEN NOT pinned THEN 'queue_drifted_unpinned_v1'
             WHEN NOT bytes THEN 'queue_drifted_no_bytea_v1' ELSE 'queue_drifted_v1' END,
        many_q[1],
        many_q[2],
        many_q[3],
        single_end,
        count_q[1], count_q[2], count_q[3], count_q[4],
        cdc_invalidator.wake_up_v1());

    -- The body goes in as a quoted literal (%L): no table or column name can end it
    -- early. When a rendered column needs them, the settings that change how values print
    -- as text are pinned, so that a key renders the same whichever session wrote the row
    -- (timestamps in UTC, ISO). Each SET clause costs every call (the setting is saved
    -- and restored), so they are left out when every rendered column prints alike anyway.
    -- CREATE OR REPLACE resets every SET clause the function had: none stays behind.
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
        'SET search_path = pg_catalog, pg_temp %s AS %L',
        fn, CASE WHEN pinned THEN format(
            'SET "TimeZone" = %L SET "DateStyle" = %L SET "IntervalStyle" = %L '
            'SET extra_float_digits = 1%s%s', 'UTC', 'ISO, MDY', 'postgres',
            CASE WHEN bytes THEN format(' SET bytea_output = %L', 'hex') ELSE '' END,
            CASE WHEN idents THEN ' SET quote_all_identifiers = off' ELSE '' END)
        ELSE '' END, body);
    EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', fn);
    -- A function's new owner must have CREATE on its schema (a superuser installing
    -- aside): an installer that is a member of the table's owner gives it that for the
    -- ALTER alone, in this transaction, which no other session sees. Not to a role that
    -- has it already: revoked from the schema's owner, it would lose what it owns by right.
    IF has_schema_privilege(owner, 'cdc_invalidator', 'CREATE') THEN
        EXECUTE format('ALTER FUNCTION %s() OWNER TO %s', fn, owner);
    ELSE
        EXECUTE format('GRANT CREATE ON SCHEMA cdc_invalidator TO %s', owner);
        EXECUTE format('ALTER FUNCTION %s() OWNER TO %s', fn, owner);
        EXECUTE format('REVOKE CREATE ON SCHEMA cdc_invalidator FROM %s', owner);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA cdc_invalidator TO %s', owner);
    EXECUTE format('GRANT INSERT (schema_name, table_name, op, old_row, new_row, rows, pid) '
                   'ON TABLE cdc_invalidator.queue_v1 TO %s', owner);
    EXECUTE format('GRANT EXECUTE ON FUNCTION cdc_invalidator.notify_row_v1(text) TO %s', owner);

    -- The table, and for a partitioned table every partition too, for a plain table its
    -- inheritance children (heirs_v1(): those not watched on their own): statement
    -- triggers fire only on the table a statement names (statement_triggers_v1: what is
    -- there already is left alone). (pg_partition_tree lists nothing for a table that is
    -- not partitioned.)
    FOR rel IN SELECT tbl UNION SELECT p.relid FROM pg_partition_tree(tbl) p
               UNION SELECT unnest(cdc_invalidator.heirs_v1(tbl, ARRAY(
                   SELECT w.relid::oid FROM cdc_invalidator.watched_v1 w WHERE w.relid <> tbl)))
    LOOP
        -- Ours there already and not firing ALWAYS (or seen so by the rebuild guard,
        -- capture_off_v1): what was written meanwhile was not captured. Swept below.
        IF cdc_invalidator.trigger_states_v1(rel) ~ '[^A]'
           OR EXISTS (SELECT FROM cdc_invalidator.capture_off_v1 o WHERE o.relid = rel::oid) THEN
            off := true;
            DELETE FROM cdc_invalidator.capture_off_v1 o WHERE o.relid = rel::oid;
        END IF;
        PERFORM cdc_invalidator.statement_triggers_v1(rel, fn);
    END LOOP;
    IF off THEN
        PERFORM cdc_invalidator.queue_sweep_once_v1(schema_n, table_n, format(
            'capture triggers of table %s were not all there and firing ALWAYS (disabled, '
            'ENABLE [REPLICA] TRIGGER, dropped or replaced) until install: what was written '
            'meanwhile was not captured',
            tbl));
    END IF;
    IF kind = 'p' THEN
        -- Made under another name (the table was renamed, and configured so, since): its
        -- sweeps would carry the old one. Made again; its copies go and come with it.
        IF EXISTS (SELECT FROM pg_trigger tg
                   WHERE tg.tgrelid = tbl AND tg.tgname = 'cdc_invalidator_part_v1'
                     AND strpos(pg_get_triggerdef(tg.oid), format('sweep_untriggered_v1(%L, %L)',
                                                                   schema_n, table_n)) = 0) THEN
            EXECUTE format('DROP TRIGGER cdc_invalidator_part_v1 ON %s', tbl);
        END IF;
        IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = tbl AND tgname = 'cdc_invalidator_part_v1') THEN
            EXECUTE format('CREATE TRIGGER cdc_invalidator_part_v1 AFTER INSERT OR UPDATE OR DELETE ON %s '
                           'FOR EACH ROW EXECUTE FUNCTION cdc_invalidator.sweep_untriggered_v1(%L, %L)',
                           tbl, schema_n, table_n);
        END IF;
        -- ALWAYS on the table and on its partitioned partitions: a partitioned table's
        -- row trigger never fires, it is what PostgreSQL copies, with its state, onto a
        -- partition made later (disabled there, a partition added under a partitioned
        -- one captured nothing). Off on the other partitions, which have statement
        -- triggers of their own (all of them, now). In that order: enabling a
        -- partitioned table's trigger enables its partitions' copies too.
        IF (SELECT tgenabled FROM pg_trigger WHERE tgrelid = tbl AND tgname = 'cdc_invalidator_part_v1') <> 'A' THEN
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER cdc_invalidator_part_v1', tbl);
        END IF;
        FOR rel IN
            SELECT tg.tgrelid::regclass FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
            WHERE tg.tgname = 'cdc_invalidator_part_v1' AND tg.tgparentid <> 0 AND tg.tgenabled <> 'A'
              AND c.relkind = 'p' AND tg.tgrelid IN (SELECT p.relid FROM pg_partition_tree(tbl) p)
        LOOP
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER cdc_invalidator_part_v1', rel);
        END LOOP;
        FOR rel IN
            SELECT tg.tgrelid::regclass FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
            WHERE tg.tgname = 'cdc_invalidator_part_v1' AND tg.tgparentid <> 0 AND tg.tgenabled <> 'D'
              AND c.relkind <> 'p' AND tg.tgrelid IN (SELECT p.relid FROM pg_partition_tree(tbl) p)
        LOOP
            EXECUTE format('ALTER TABLE %s DISABLE TRIGGER cdc_invalidator_part_v1', rel);
        END LOOP;
    END IF;

    -- The rebuild guard's triggers (rebuild_guard.sql) give way to the capture triggers
    -- now in place: the stand-in of a table that took a watched name after the last
    -- install, and the TRUNCATE trigger of a partition created since (looked up first:
    -- DROP TRIGGER IF EXISTS would lock the table when there is none). A partition's copy
    -- of a row trigger goes with the table's.
    FOR trg IN
        SELECT tg.tgname AS name, tg.tgrelid::regclass AS rel FROM pg_trigger tg
        WHERE (tg.tgrelid = tbl OR tg.tgrelid IN (SELECT p.relid FROM pg_partition_tree(tbl) p))
          AND tg.tgparentid = 0
          AND tg.tgname IN ('cdc_invalidator_stand_in_v1', 'cdc_invalidator_stand_in_row_v1',
                            'cdc_invalidator_part_trunc_v1')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trg.name, trg.rel);
    END LOOP;
    -- The owners of the partitioned tables of the tree may add partitions: PostgreSQL
    -- copies our row trigger onto them as the role doing it, which must be able to run
    -- its function.
    PERFORM cdc_invalidator.regrant_sweeps_v1(o.owner)
    FROM (SELECT DISTINCT c.relowner::regrole AS owner FROM pg_class c
          WHERE c.oid IN (SELECT tbl UNION SELECT p.relid FROM pg_partition_tree(tbl) p)
            AND (c.relkind = 'p' OR c.oid = tbl)) o;

    INSERT INTO cdc_invalidator.watched_v1 (relid, columns, attnums, schema_name, table_name,
                                           judge, filter_columns, judged, judged_natts)
    VALUES (tbl, key_columns, attnums, schema_n, table_n, judge, filter_columns, judged, natts)
    ON CONFLICT (relid) DO UPDATE SET columns = EXCLUDED.columns, attnums = EXCLUDED.attnums,
        schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
        judge = EXCLUDED.judge, filter_columns = EXCLUDED.filter_columns,
        judged = EXCLUDED.judged, judged_natts = EXCLUDED.judged_natts, watched_at = now(),
        -- Renamed since the last watch(): the name its events carried until now is kept
        -- (rows queued under it, and dead letters requeued later, are still this
        -- table's). Here, in install's transaction: a listener that reads such a row
        -- finds the name either as watched_v1's name or in this list, never in neither.
        renamed_from = CASE
            WHEN watched_v1.table_name IS NULL
                 OR (watched_v1.schema_name, watched_v1.table_name)
                    = (EXCLUDED.schema_name, EXCLUDED.table_name)
                 OR coalesce(watched_v1.renamed_from, '[]')
                    @> jsonb_build_array(jsonb_build_array(watched_v1.schema_name,
                                                           watched_v1.table_name))
            THEN watched_v1.renamed_from
            ELSE coalesce(watched_v1.renamed_from, '[]')
                 || jsonb_build_array(jsonb_build_array(watched_v1.schema_name,
                                                        watched_v1.table_name))
        END;
END
$watch$;

-- unwatch(table): remove our triggers (on its partitions too) and the table's trigger
-- function. Events already queued stay and are still processed.
CREATE OR REPLACE FUNCTION cdc_invalidator.unwatch(tbl regclass)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $unwatch$
DECLARE
    t     record;
    fn    regprocedure := to_regprocedure(format('cdc_invalidator.%I()', 'capture_' || tbl::oid || '_v1'));
    owner regrole;
BEGIN
    FOR t IN
        SELECT tg.tgname, tg.tgrelid::regclass AS rel
        FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
        WHERE (tg.tgrelid = tbl OR tg.tgrelid IN (SELECT pt.relid FROM pg_partition_tree(tbl) pt)
               -- A partition moved to another table since keeps triggers calling this
               -- table's function: they go with it (the function could not, else).
               OR tg.tgfoid = fn)
          AND tg.tgname LIKE 'cdc\_invalidator\_%\_v1'
          AND p.pronamespace = 'cdc_invalidator'::regnamespace
          -- A partition's copy of the table's row trigger goes with the table's.
          AND tg.tgparentid = 0
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
    -- The triggers share one function, found by name (a table that was dropped took its
    -- triggers along). Its owner (the table's) keeps its INSERT on the queue, and the
    -- payload's notify_row_v1(), only while it owns another table's capture function.
    IF fn IS NOT NULL THEN
        SELECT p.proowner INTO owner FROM pg_proc p WHERE p.oid = fn;
        EXECUTE format('DROP FUNCTION %s', fn);
        IF owner <> (SELECT nspowner FROM pg_namespace WHERE nspname = 'cdc_invalidator')
           AND NOT EXISTS (
               SELECT FROM pg_proc p
               WHERE p.pronamespace = 'cdc_invalidator'::regnamespace AND p.proowner = owner
                 AND p.proname LIKE 'capture\_%\_v1') THEN
            EXECUTE format('REVOKE INSERT (schema_name, table_name, op, old_row, new_row, rows, pid) '
                           'ON TABLE cdc_invalidator.queue_v1 FROM %s', owner);
            EXECUTE format('REVOKE EXECUTE ON FUNCTION cdc_invalidator.notify_row_v1(text) FROM %s', owner);
        END IF;
    END IF;
    -- Whoever owned a partitioned table whose row trigger went keeps the grant it
    -- needed for it only while it owns another.
    IF owner IS NOT NULL THEN
        PERFORM cdc_invalidator.regrant_sweeps_v1(owner);
    END IF;
    PERFORM cdc_invalidator.regrant_sweeps_v1(c.relowner::regrole)
    FROM pg_class c WHERE c.oid = tbl;
    DELETE FROM cdc_invalidator.watched_v1 WHERE relid = tbl;
END
$unwatch$;

-- Changing triggers runs with the installer's rights: nobody else may call these.
REVOKE ALL ON FUNCTION cdc_invalidator.watch(regclass, text[], text, text[], boolean, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.unwatch(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.missing_columns(regclass, text[]) FROM PUBLIC;
-- Nobody but our triggers runs this one (and it queues nothing for a table not watched
-- under the name it is given). The owners of partitioned tables carrying our row
-- triggers are granted it (regrant_sweeps_v1()), for their partitions.
REVOKE ALL ON FUNCTION cdc_invalidator.sweep_untriggered_v1() FROM PUBLIC;
