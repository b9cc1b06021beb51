-- cdc-invalidator: logical-replication capture, schema version 1 (beside schema.sql,
-- whose dead letters it shares; its queue and watch() stay unused in this mode).
--
-- What this adds, inside the schema "cdc_invalidator":
--   slot_state_v1         per replication slot: the last position the listener told the
--                         slot it had finished (saved before it tells the slot, so the
--                         slot is never ahead of it unless somebody else moved or
--                         re-created the slot), and why a full sweep is owed, if it is.
--   replica_identity_v1   the REPLICA IDENTITY a table had before install set FULL, so
--                         that uninstall can put it back.
--   history_v1            what was invalidated recently, for replay.
--   logical_dead_letter_v1  a sequence: dead letters of this mode have no queue id and
--                         take negative ids from it.
--   published_v1          per configured table: its relation (OID) and its key columns'
--                         numbers, recorded at install, so that the listener follows a
--                         table or column renamed later (docs/DBA.md, "Schema migrations").
--   ensure_replica_identity(), restore_replica_identity(), publish(), record_published()
--   ddl_guard()           the event trigger cdc_invalidator_guard (created when install
--                         runs as a superuser): keeps DDL from breaking writes or capture.

CREATE TABLE IF NOT EXISTS cdc_invalidator.slot_state_v1 (
    slot_name         text PRIMARY KEY,
    acked_lsn         pg_lsn,  -- NULL until the listener first used a slot of this name
    resync_reason     text,    -- changes may have been missed: sweep, then clear
    last_processed_at timestamptz,
    events_processed  bigint NOT NULL DEFAULT 0
);

-- The run of the server the listener last noted (revision 7: server_run_v1() in
-- schema.sql): another one, where writers commit asynchronously, owes a sweep.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.slot_state_v1', 'server_run', 'text');
-- The table each row was recorded in (revision 8): slot_state_v1's oid, when install or
-- the listener last wrote the row. A dump restored (into another database of this cluster,
-- or over this one) makes the table anew and copies the rows into it: the database went
-- back to the dump's time, and a row recorded in another table owes the slot in use a
-- sweep (logical_install.sql; the listener at connect, slot_info.sql). A copy of the data
-- directory keeps the oid. Recorded by install where none is (an upgrade), owing nothing.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.slot_state_v1', 'recorded_in', 'oid');
UPDATE cdc_invalidator.slot_state_v1
SET recorded_in = 'cdc_invalidator.slot_state_v1'::regclass
WHERE recorded_in IS NULL;
-- And the database (revision 9: database_oid_v1() in schema.sql): a row recorded in
-- another one came with a copy of it (CREATE DATABASE ... TEMPLATE) put in this one's
-- place, which keeps the table's oid.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.slot_state_v1', 'recorded_in_database', 'oid');
UPDATE cdc_invalidator.slot_state_v1
SET recorded_in_database = cdc_invalidator.database_oid_v1()
WHERE recorded_in_database IS NULL;
-- The server's lineage (revision 10: server_lineage_v1() in schema.sql, 'SYSTEM timeline
-- N') when the listener last connected, or install ran: it comes with the data, so a
-- listener started afresh on a standby promoted with the slot synced to it (a failover
-- slot, PostgreSQL 17+) finds the old primary's here, and sweeps for what the failover
-- lost (capture/logical_open.py), as trigger mode does with listener_state_v1's.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.slot_state_v1', 'server_lineage', 'text');

CREATE SEQUENCE IF NOT EXISTS cdc_invalidator.logical_dead_letter_v1;

-- What the listener invalidated recently, for replay after Redis restores an old
-- snapshot: acknowledged batches, several gathered into a row (capture/history_writer.py),
-- their events' key columns as one JSON array of [schema, table, op, old, new]. (Trigger
-- mode keeps its queue rows for that instead.)
-- Pruned by the listener after replay_history.
CREATE TABLE IF NOT EXISTS cdc_invalidator.history_v1 (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    events json NOT NULL
);
DO $history_index$
BEGIN
    -- (looked up first: CREATE INDEX IF NOT EXISTS locks the table before it looks, and
    -- install is one transaction: the listener's history writes would wait for it)
    IF to_regclass('cdc_invalidator.history_v1_at') IS NULL THEN
        CREATE INDEX history_v1_at ON cdc_invalidator.history_v1 (at);
    END IF;
END
$history_index$;
-- A batch's JSON (about 100 bytes per change) is compressed as it is stored, by the
-- listener's session, on the server's cores: lz4 where the server was built with it,
-- else PostgreSQL's default, pglz, which measured twice that session's CPU (a 1M-change
-- backlog: 0.93 s against 0.47 s; the WAL sender and the listener share those cores).
-- Rows already stored keep theirs.
DO $history_lz4$
BEGIN
    IF EXISTS (
        SELECT FROM pg_settings
        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
    ) AND NOT EXISTS (  -- (already: no lock taken again)
        SELECT FROM pg_attribute
        WHERE attrelid = 'cdc_invalidator.history_v1'::regclass AND attname = 'events'
          AND attcompression = 'l'
    ) THEN
        ALTER TABLE cdc_invalidator.history_v1 ALTER COLUMN events SET COMPRESSION lz4;
    END IF;
END
$history_lz4$;

CREATE TABLE IF NOT EXISTS cdc_invalidator.replica_identity_v1 (
    relid          regclass PRIMARY KEY,
    previous       "char" NOT NULL,  -- pg_class.relreplident: d, n, i (f is never recorded)
    previous_index name,             -- for i: the index it used
    changed_at     timestamptz NOT NULL DEFAULT now()
);

-- ensure_replica_identity(table, columns): make UPDATE and DELETE carry the old values of
-- `columns`. The default replica identity sends only the old primary key, so a key
-- built from another column (user:email:{email}) could not be deleted when the email
-- changes or the row goes; REPLICA IDENTITY FULL sends the whole old row. (Its cost:
-- the whole old row is written to WAL for every UPDATE and DELETE.) Tables whose
-- identity already covers the columns are left alone. Applies to every partition too,
-- since each partition logs its own rows.
CREATE OR REPLACE FUNCTION cdc_invalidator.ensure_replica_identity(tbl regclass, key_columns text[])
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $ensure$
DECLARE
    rel      regclass;
    ident    "char";
    covered  text[];
    idx      name;
BEGIN
    -- (A foreign table has no identity: its writes are not decoded here at all, which
    -- the guard refuses, and check reports. Nor has a temporary inheritance child, which
    -- is never published: another session's cannot even be altered.)
    FOR rel IN SELECT r.relid FROM (SELECT tbl AS relid
                                    UNION SELECT unnest(cdc_invalidator.partitions_v1(tbl))) r
               JOIN pg_class c ON c.oid = r.relid
               WHERE c.relkind <> 'f' AND c.relpersistence <> 't' LOOP
        SELECT c.relreplident INTO ident FROM pg_class c WHERE c.oid = rel;
        CONTINUE WHEN ident = 'f';
        SELECT array_agg(a.attname::text), min(ic.relname) INTO covered, idx
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = rel
          AND ((ident = 'd' AND i.indisprimary) OR (ident = 'i' AND i.indisreplident));
        CONTINUE WHEN coalesce(key_columns <@ covered, false);
        -- (USING INDEX of an index dropped since is NOTHING: there is none to put back)
        IF ident = 'i' AND idx IS NULL THEN
            ident := 'n';
        END IF;
        INSERT INTO cdc_invalidator.replica_identity_v1 (relid, previous, previous_index)
        VALUES (rel, ident, CASE WHEN ident = 'i' THEN idx END)
        ON CONFLICT (relid) DO NOTHING;
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
        RAISE NOTICE 'cdc_invalidator: % now has REPLICA IDENTITY FULL (was %)', rel,
            CASE ident WHEN 'd' THEN 'DEFAULT' WHEN 'n' THEN 'NOTHING' ELSE 'USING INDEX ' || idx END;
    END LOOP;
END
$ensure$;

-- without_replica_identity_v1(table): the table, or a partition of it, that has no
-- replica identity (NULL: none). Published, its UPDATEs and DELETEs would fail ("cannot
-- update table ... because it does not have a replica identity and publishes updates").
CREATE OR REPLACE FUNCTION cdc_invalidator.without_replica_identity_v1(tbl regclass)
RETURNS regclass
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $without$
    SELECT r.relid::regclass
    FROM (SELECT tbl AS relid UNION SELECT unnest(cdc_invalidator.partitions_v1(tbl))) r
    JOIN pg_class c ON c.oid = r.relid
    WHERE c.relkind = 'r' AND c.relpersistence <> 't'
      AND (c.relreplident = 'n'
           OR (c.relreplident = 'd' AND NOT EXISTS (
               SELECT FROM pg_index i WHERE i.indrelid = r.relid AND i.indisprimary))
           -- (USING INDEX of an index dropped since: PostgreSQL treats it as NOTHING)
           OR (c.relreplident = 'i' AND NOT EXISTS (
               SELECT FROM pg_index i WHERE i.indrelid = r.relid AND i.indisreplident)))
    LIMIT 1;
$without$;

-- require_replica_identity(table): for a table whose identity install leaves alone
-- (replica_identity = "keep"): refuse one without any (without_replica_identity_v1()).
CREATE OR REPLACE FUNCTION cdc_invalidator.require_replica_identity(tbl regclass)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $require$
DECLARE
    rel regclass := cdc_invalidator.without_replica_identity_v1(tbl);
BEGIN
    IF rel IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator: table % has no replica identity: once published, its '
            'updates and deletes would fail', rel
            USING HINT = 'Give it a primary key (in the same transaction, for a key being '
                         'replaced), or set replica_identity = "full" in the configuration '
                         'so that install sets REPLICA IDENTITY FULL.',
                  ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END
$require$;

-- restore_replica_identity(keep): put back the identity of every table we set FULL,
-- except those in `keep` (tables still configured). A table someone changed since is
-- left as it is now.
CREATE OR REPLACE FUNCTION cdc_invalidator.restore_replica_identity(keep regclass[])
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $restore$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT ri.* FROM cdc_invalidator.replica_identity_v1 ri
        WHERE NOT ri.relid = ANY (
            SELECT k FROM unnest(keep) k
            UNION SELECT p.relid FROM unnest(keep) k, pg_partition_tree(k) p
            -- (and their inheritance children, which ensure_replica_identity() sets too)
            UNION SELECT unnest(cdc_invalidator.partitions_v1(k)) FROM unnest(keep) k)
    LOOP
        IF (SELECT relreplident FROM pg_class WHERE oid = r.relid) = 'f' THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY %s', r.relid,
                CASE r.previous WHEN 'd' THEN 'DEFAULT' WHEN 'n' THEN 'NOTHING'
                    ELSE format('USING INDEX %I', r.previous_index) END);
        END IF;
        DELETE FROM cdc_invalidator.replica_identity_v1 WHERE relid = r.relid;
    END LOOP;
END
$restore$;

-- require_publishable(table): refuse a table that, published, would make its own
-- UPDATEs and DELETEs fail. PostgreSQL 18 refuses them on a published table whose replica
-- identity holds a generated column the publication does not carry ("Replica identity
-- must not contain unpublished generated columns"), and no publication carries a virtual
-- one: REPLICA IDENTITY FULL with a virtual generated column. (Stored ones are carried:
-- publish() sets publish_generated_columns = stored.) Before 18 there is no virtual column.
CREATE OR REPLACE FUNCTION cdc_invalidator.require_publishable(tbl regclass)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $publishable$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS rel, a.attname FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.oid IN (SELECT tbl UNION SELECT unnest(cdc_invalidator.partitions_v1(tbl)))
          AND c.relreplident = 'f' AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = 'v'
        ORDER BY c.oid, a.attnum LIMIT 1
    LOOP
        RAISE EXCEPTION 'cdc_invalidator: table % has REPLICA IDENTITY FULL and the virtual '
            'generated column %: once published, its updates and deletes would fail (no '
            'publication carries a virtual generated column)', r.rel, quote_ident(r.attname)
            USING HINT = 'Give the table a primary key or a replica identity index covering '
                         'the key columns (and no column filter), so that it needs no REPLICA '
                         'IDENTITY FULL; or make the column STORED.',
                  ERRCODE = 'object_not_in_prerequisite_state';
    END LOOP;
END
$publishable$;

-- publish(name, tables): the publication the listener streams, holding exactly
-- `tables` (with a partitioned table, all its partitions, present and future). Each
-- partition's changes are published under its own name, which the listener maps to
-- the table the configuration names: publish_via_partition_root would be simpler, but
-- PostgreSQL then does not publish a TRUNCATE of one partition at all. A plain table's
-- inheritance children (heirs_v1(), but not those configured on their own) are listed
-- too, each whole and under its own name, which the listener maps the same way: a plain
-- table is listed ONLY (publish_list()), for PostgreSQL would give each child the
-- table's column list, which a child with REPLICA IDENTITY FULL cannot have (its UPDATEs
-- and DELETEs would fail); and a child made later is not published until install (nor
-- would PostgreSQL publish it: only a partitioned table's publication follows). From PostgreSQL
-- 18 on it also carries stored generated columns (publish_generated_columns = stored):
-- a table with REPLICA IDENTITY FULL and one of them could not be updated otherwise.
CREATE OR REPLACE FUNCTION cdc_invalidator.publish(pubname name, tables regclass[])
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $publish$
DECLARE
    list text := (SELECT string_agg(cdc_invalidator.publish_list(t), ', ') FROM unnest(tables) t);
    -- (temporary, unlogged and foreign children cannot be published: left out, and
    -- publication_drift_v1() names them)
    heirs regclass[] := ARRAY(
        SELECT c.oid::regclass
        FROM pg_class c
        WHERE c.oid IN (SELECT unnest(cdc_invalidator.heirs_v1(t, tables::oid[])) FROM unnest(tables) t)
          AND c.relkind = 'r' AND c.relpersistence = 'p'
        ORDER BY c.oid);
BEGIN
    PERFORM cdc_invalidator.require_publishable(t) FROM unnest(tables) t;
    list := concat_ws(', ', list, (SELECT string_agg('ONLY ' || h::text, ', ') FROM unnest(heirs) h));
    -- A table this install newly publishes, while a slot may already stream the
    -- publication: a change is published or not by the catalog as of its own place in
    -- the WAL, not its commit's. A writer's change written before this commit and
    -- committed after it would be left out of the stream, and its key kept (a CI run's
    -- writers: an UPDATE's key still cached 20 s after). SHARE conflicts with every
    -- write: a writer's open transaction on it commits before this script does, and one
    -- that comes later waits for this commit, its changes then written after it. Reads
    -- do not wait; a table published already is not locked (install run again waits for
    -- no writer), nor any on the first install, whose slot is made after this commit and
    -- decodes only transactions that begin after it. (Not ONLY for a partitioned table:
    -- its partitions are written to on their own, and published with it.)
    -- The waits are bounded all together (lock_tables_v1()).
    IF EXISTS (SELECT FROM pg_publication p WHERE p.pubname = publish.pubname)
       OR EXISTS (SELECT FROM pg_replication_slots s
                  WHERE s.database = current_database() AND s.plugin = 'pgoutput') THEN
        PERFORM cdc_invalidator.lock_tables_v1(ARRAY(
            SELECT CASE WHEN c.relkind = 'p' THEN '' ELSE 'ONLY ' END || c.oid::regclass::text
            FROM pg_class c
            WHERE c.oid = ANY ((tables || heirs)::oid[])
              AND NOT EXISTS (SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                              WHERE p.pubname = publish.pubname AND pr.prrelid = c.oid)
            ORDER BY c.oid), 'SHARE');
    END IF;
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pg_publication.pubname = publish.pubname) THEN
        EXECUTE format('CREATE PUBLICATION %I FOR TABLE %s', pubname, list);
    ELSE
        EXECUTE format('ALTER PUBLICATION %I SET TABLE %s', pubname, list);
    END IF;
    EXECUTE format('ALTER PUBLICATION %I SET (publish = %L, publish_via_partition_root = false)',
                   pubname, 'insert, update, delete, truncate');
    IF current_setting('server_version_num')::int >= 180000 THEN
        EXECUTE format('ALTER PUBLICATION %I SET (publish_generated_columns = stored)', pubname);
    END IF;
END
$publish$;

-- What install configured, by relation and column number rather than by name: the
-- names in the configuration are resolved here once, and a table or key column renamed
-- afterwards is still the same relid and attnum. (pgoutput's Relation messages carry the
-- relid, and the column names as they were when the change was made.)
CREATE TABLE IF NOT EXISTS cdc_invalidator.published_v1 (
    relid       regclass PRIMARY KEY,
    schema_name text NOT NULL,      -- as configured
    table_name  text NOT NULL,
    columns     text[] NOT NULL,    -- the key templates' columns, as configured
    attnums     int2[] NOT NULL,    -- their numbers (NULL where the column did not exist)
    keep        boolean NOT NULL,   -- replica_identity = "keep"
    publication name NOT NULL
);
-- The table's column filter ('ignore' or 'columns'; NULL: none): the listener judges its
-- UPDATEs from the whole old row, which the DDL guard keeps sent.
-- (Only where missing: the DDL guard reads this table in every role's ALTER TABLE.)
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.published_v1', 'judge', 'text');
-- A published table dropped while the rebuild guard ran (the listener reads neither
-- column: no new revision): the dropping
-- transaction (dropped_by, set by dropped_v1()), and, once a later DDL saw that commit, a
-- position the drop's commit and every change of the table precede (dropped_before). The
-- row is what maps the dropped relation's changes to its configured table for a listener
-- still behind the drop; once every logical slot of the database has confirmed past
-- dropped_before, none is left to decode, and prune_dropped_v1() forgets the row.
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.published_v1', 'dropped_by', 'xid8');
SELECT cdc_invalidator.add_column_v1('cdc_invalidator.published_v1', 'dropped_before', 'pg_lsn');

-- prune_dropped_v1(): called by the rebuild guard at each DDL command (it runs as the
-- superuser who installed it). Without it a table dropped and made again under its name
-- left a row here (and in replica_identity_v1) per cycle, for good: every later DDL
-- command and every listener read them all, and the listener kept each one's relation.
-- Rows another transaction holds are skipped (SKIP LOCKED): unrelated DDL never waits.
CREATE OR REPLACE FUNCTION cdc_invalidator.prune_dropped_v1()
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $prune$
DECLARE
    confirmed pg_lsn;
BEGIN
    -- A drop seen committed (a row whose dropped_by we can see was written by it, so it
    -- committed, unless it is this transaction: pg_xact_status then says in progress;
    -- NULL: too old to tell, committed since we see it): its commit record, and every
    -- change of the table (the drop held its lock), precede the WAL written so far.
    UPDATE cdc_invalidator.published_v1 p SET dropped_before = pg_current_wal_insert_lsn()
    WHERE p.relid IN (SELECT x.relid FROM cdc_invalidator.published_v1 x
                      WHERE x.dropped_by IS NOT NULL AND x.dropped_before IS NULL
                        AND coalesce(pg_xact_status(x.dropped_by), 'committed') = 'committed'
                      FOR UPDATE SKIP LOCKED);
    -- How far every logical slot of this database has confirmed (any of them may be the
    -- listener's, or a tool's reading our publication): none behind, nothing to decode.
    -- A slot still being made (no confirmed position yet) starts after now: none pruned.
    SELECT CASE WHEN count(*) = 0 THEN 'FFFFFFFF/FFFFFFFF'::pg_lsn
                WHEN bool_and(s.confirmed_flush_lsn IS NOT NULL) THEN min(s.confirmed_flush_lsn)
           END
    INTO confirmed
    FROM pg_replication_slots s
    WHERE s.slot_type = 'logical' AND s.database = current_database();
    DELETE FROM cdc_invalidator.published_v1 p
    WHERE p.relid IN (SELECT x.relid FROM cdc_invalidator.published_v1 x
                      WHERE x.dropped_before <= confirmed
                        AND NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = x.relid)
                      FOR UPDATE SKIP LOCKED);
    -- The identity a dropped table had: nothing for uninstall to put back (a drop this
    -- transaction made and rolls back takes this deletion back with it).
    DELETE FROM cdc_invalidator.replica_identity_v1 ri
    WHERE ri.relid IN (SELECT x.relid FROM cdc_invalidator.replica_identity_v1 x
                       WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = x.relid)
                       FOR UPDATE SKIP LOCKED);
END
$prune$;
REVOKE ALL ON FUNCTION cdc_invalidator.prune_dropped_v1() FROM PUBLIC;

-- record_published(...): one configured table, resolved now.
CREATE OR REPLACE FUNCTION cdc_invalidator.record_published(
    tbl regclass, tbl_schema text, tbl_name text, key_columns text[], keep boolean, pubname name)
RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $record$
    INSERT INTO cdc_invalidator.published_v1 AS p
        (relid, schema_name, table_name, columns, attnums, keep, publication)
    VALUES (tbl, tbl_schema, tbl_name, key_columns,
            ARRAY(SELECT (SELECT a.attnum FROM pg_attribute a
                          WHERE a.attrelid = tbl AND a.attname = k.name
                            AND a.attnum > 0 AND NOT a.attisdropped)
                  FROM unnest(key_columns) WITH ORDINALITY AS k(name, ord) ORDER BY k.ord),
            keep, pubname)
    ON CONFLICT (relid) DO UPDATE SET
        schema_name = excluded.schema_name, table_name = excluded.table_name,
        columns = excluded.columns, attnums = excluded.attnums, keep = excluded.keep,
        publication = excluded.publication;
$record$;

-- cover_identity_v1(rel, configured, key_columns, keep, judge): the replica identity the
-- rebuild guard gives a table it publishes for a configured one (a table that took its
-- name, or an inheritance child made later), as install gives the configured table's:
-- left as it is but required with replica_identity = "keep"; else made to cover the key
-- columns, or every column of `configured` where a column filter judges UPDATEs from the
-- whole old row (record_filter()).
CREATE OR REPLACE FUNCTION cdc_invalidator.cover_identity_v1(
    rel regclass, configured regclass, key_columns text[], keep boolean, judge text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $cover$
BEGIN
    IF keep THEN
        PERFORM cdc_invalidator.require_replica_identity(rel);
    ELSE
        PERFORM cdc_invalidator.ensure_replica_identity(rel, CASE
            WHEN judge IS NULL THEN key_columns
            ELSE ARRAY(SELECT a.attname::text FROM pg_attribute a
                       WHERE a.attrelid = configured AND a.attnum > 0 AND NOT a.attisdropped)
            END);
    END IF;
END
$cover$;

-- record_filter(table, judge, columns, keep): a configured table's column filter. Its
-- listed columns must be the table's (as the catalog names them); its UPDATEs are judged
-- by comparing old and new values, so the whole old row must be sent: REPLICA IDENTITY
-- FULL (unless replica_identity = "keep", or an identity index already covers every
-- column). Run after record_published().
CREATE OR REPLACE FUNCTION cdc_invalidator.record_filter(
    tbl regclass, judge text, filter_columns text[], keep boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $filter$
DECLARE
    missing text;
BEGIN
    missing := cdc_invalidator.missing_columns(tbl, filter_columns);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator: table % has no column % (listed in %)', tbl,
            missing, CASE judge WHEN 'ignore' THEN 'ignore_columns' ELSE 'columns' END
            USING ERRCODE = 'undefined_column';
    END IF;
    UPDATE cdc_invalidator.published_v1 SET judge = record_filter.judge WHERE relid = tbl;
    IF NOT keep THEN
        PERFORM cdc_invalidator.ensure_replica_identity(tbl, ARRAY(
            SELECT a.attname::text FROM pg_attribute a
            WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped));
    END IF;
END
$filter$;

-- publish_list(table): what the publication carries of a table: the fewest columns the
-- server allows. A column list must cover the replica identity when UPDATE and DELETE
-- are published, so a table with REPLICA IDENTITY FULL is published whole (a list would
-- make its UPDATEs and DELETEs fail), and so is a partitioned table (PostgreSQL allows no
-- list there without publish_via_partition_root). Otherwise: the key columns and the
-- identity's columns. Only while the DDL guard is installed: a list on a table whose
-- identity a DBA later sets FULL would make its writes fail, and the guard is what drops
-- the list then. A plain table is named ONLY: its inheritance children are published
-- on their own (publish()).
CREATE OR REPLACE FUNCTION cdc_invalidator.publish_list(tbl regclass)
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $list$
    SELECT CASE
        WHEN c.relkind <> 'r' OR c.relispartition OR c.relreplident NOT IN ('d', 'i')
             OR NOT EXISTS (SELECT FROM pg_event_trigger
                            WHERE evtname = 'cdc_invalidator_guard' AND evtenabled <> 'D')
             OR NOT EXISTS (SELECT FROM cdc_invalidator.published_v1 p WHERE p.relid = tbl)
        THEN CASE WHEN c.relkind = 'r' THEN 'ONLY ' ELSE '' END || tbl::text
        ELSE format('ONLY %s (%s)', tbl, (
            SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
            FROM pg_attribute a
            WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
              AND (a.attnum = ANY ((SELECT p.attnums FROM cdc_invalidator.published_v1 p
                                    WHERE p.relid = tbl)::int2[])
                   OR a.attnum = ANY ((SELECT i.indkey FROM pg_index i
                                       WHERE i.indrelid = tbl
                                         AND ((c.relreplident = 'd' AND i.indisprimary)
                                              OR (c.relreplident = 'i' AND i.indisreplident))
                                       LIMIT 1)::int2[]))))
    END
    FROM pg_class c WHERE c.oid = tbl;
$list$;

-- publication_drift_v1(tbl): how the publication of the configured tables
-- (published_v1; `tbl`: that one, NULL: all) differs from what install made it, in a
-- way that leaves changes unpublished (and so their keys cached), or fails writes:
--   * publish options without one of insert, update, delete, truncate;
--     publish_via_partition_root (no TRUNCATE of a partition is published then); from
--     PostgreSQL 18, the stored generated columns of a table not published (a FULL
--     identity's UPDATE fails);
--   * a configured table taken out of it (neither listed, nor in a schema it lists);
--   * a row filter, or a column list without the key columns, on a configured table or
--     on one of its partitions (published under its own name, with its own filter); a
--     column list that does not cover the table's replica identity (its UPDATEs and
--     DELETEs fail);
--   * a partition whose changes are not in the WAL (UNLOGGED) or not here at all (a
--     foreign table).
-- NULL when none, or when the publication is gone (the guard refuses that on its own;
-- `check` and the listener say so).
DROP FUNCTION IF EXISTS cdc_invalidator.publication_drift_v1();  -- (without `tbl`)
CREATE OR REPLACE FUNCTION cdc_invalidator.publication_drift_v1(tbl regclass DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $drift$
    WITH RECURSIVE ours AS MATERIALIZED (
        SELECT p.relid::oid AS root, pub.*, to_jsonb(pub) ->> 'pubgencols' AS gencols,
               ARRAY(SELECT a.attname FROM pg_attribute a
                     WHERE a.attrelid = p.relid AND a.attnum = ANY (p.attnums)) AS key_names
        FROM cdc_invalidator.published_v1 p
        JOIN pg_class c ON c.oid = p.relid
        JOIN pg_publication pub ON pub.pubname = p.publication
        WHERE tbl IS NULL OR p.relid = tbl
    ), tree (root, rel) AS (
        -- Each configured table and each of its partitions, from pg_inherits
        -- (pg_partition_tree() would lock every partition: 16 of 30 ms for 1,000).
        SELECT o.root, o.root FROM ours o
        UNION ALL
        SELECT t.root, i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.rel
    ), rels AS (
        -- With our publication's row for each (if any). (What needs a look-up of its own
        -- is asked below, in the CASE, for the few rows it concerns: a tree of 1,000
        -- partitions is read at each DDL of one.)
        SELECT o.*, t.rel, t.rel = o.root AS is_root, pr.oid AS prid, pr.prqual,
               pr.prattrs::int2[] AS prattrs, cl.relkind, cl.relpersistence, cl.relnamespace
        FROM ours o
        JOIN tree t ON t.root = o.root
        -- (not a session's temporary inheritance child: no other session reaches its
        -- rows, nor may publish it)
        JOIN pg_class cl ON cl.oid = t.rel AND cl.relpersistence <> 't'
        LEFT JOIN pg_publication_rel pr ON pr.prpubid = o.oid AND pr.prrelid = t.rel
    )
    SELECT d.problem FROM (
        SELECT CASE
            WHEN NOT (r.pubinsert AND r.pubupdate AND r.pubdelete AND r.pubtruncate)
                THEN format('publication %I publishes only %s', r.pubname, coalesce(
                    nullif(concat_ws(', ', CASE WHEN r.pubinsert THEN 'insert' END,
                                     CASE WHEN r.pubupdate THEN 'update' END,
                                     CASE WHEN r.pubdelete THEN 'delete' END,
                                     CASE WHEN r.pubtruncate THEN 'truncate' END), ''),
                    'nothing'))
            WHEN r.pubviaroot
                THEN format('publication %I publishes through partition roots '
                            '(publish_via_partition_root), and so no TRUNCATE of a partition',
                            r.pubname)
            -- (Only where one is: a publication made before 18 and carried to it by
            -- pg_upgrade or a dump publishes none, and refused every DDL of every table.)
            WHEN r.gencols IS NOT NULL AND r.gencols <> 's'
                 AND EXISTS (SELECT FROM pg_attribute a
                             WHERE a.attrelid = r.rel AND a.attgenerated = 's'
                               AND NOT a.attisdropped)
                THEN format('publication %I does not publish the stored generated columns '
                            'of table %s', r.pubname, r.rel::regclass)
            WHEN r.is_root AND r.prid IS NULL
                 AND NOT EXISTS (SELECT FROM pg_publication_namespace pn
                                 WHERE pn.pnpubid = r.oid AND pn.pnnspid = r.relnamespace)
                THEN format('table %s was taken out of publication %I', r.rel::regclass, r.pubname)
            WHEN r.relpersistence <> 'p'
                THEN format('partition %s of a table publication %I holds is UNLOGGED: its '
                            'changes are not in the WAL', r.rel::regclass, r.pubname)
            WHEN r.relkind = 'f'
                THEN format('partition %s of a table publication %I holds is a foreign table: '
                            'its changes are made on another server', r.rel::regclass, r.pubname)
            WHEN r.prqual IS NOT NULL
                THEN format('publication %I publishes only the rows of table %s that its row '
                            'filter keeps', r.pubname, r.rel::regclass)
            -- (a partition may number the key columns otherwise: looked up by name)
            WHEN r.prattrs IS NOT NULL
                 AND NOT (ARRAY(SELECT a.attnum FROM pg_attribute a
                                WHERE a.attrelid = r.rel AND a.attname = ANY (r.key_names))
                          <@ r.prattrs)
                THEN format('the column list of table %s in publication %I leaves out key '
                            'columns', r.rel::regclass, r.pubname)
            WHEN r.prattrs IS NOT NULL AND EXISTS (
                    SELECT FROM pg_class c2 WHERE c2.oid = r.rel AND (
                        (c2.relreplident = 'f' AND EXISTS (
                            SELECT FROM pg_attribute a
                            WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped
                              AND a.attnum <> ALL (r.prattrs)))
                        OR EXISTS (
                            SELECT FROM pg_index i, unnest(i.indkey::int2[]) k (attnum)
                            WHERE i.indrelid = r.rel AND k.attnum <> ALL (r.prattrs)
                              AND ((c2.relreplident = 'd' AND i.indisprimary)
                                   OR (c2.relreplident = 'i' AND i.indisreplident)))))
                THEN format('the column list of table %s in publication %I does not cover its '
                            'replica identity: its UPDATEs and DELETEs fail', r.rel::regclass,
                            r.pubname)
        END AS problem
        FROM rels r
    ) d
    WHERE d.problem IS NOT NULL
    ORDER BY 1
    LIMIT 1
$drift$;

-- publication_touched_v1(): whether the command this event trigger fires for changed a
-- publication of ours. ddl_command_end: it names ours (the publication, a table or a
-- schema in it), or ours no longer exists under its name (renamed, dropped). sql_drop:
-- what it dropped was ours, or of ours (ALTER PUBLICATION ... DROP TABLE, SET TABLE
-- name no other object). A command that touches only other publications is none of ours.
CREATE OR REPLACE FUNCTION cdc_invalidator.publication_touched_v1(event text)
RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $touched$
BEGIN
    IF event = 'sql_drop' THEN
        RETURN EXISTS (
            SELECT FROM pg_event_trigger_dropped_objects() o
            WHERE CASE o.object_type
                      WHEN 'publication' THEN o.address_names[1]
                      WHEN 'publication relation' THEN o.address_args[1]
                      WHEN 'publication namespace' THEN o.address_args[1]
                  END IN (SELECT p.publication FROM cdc_invalidator.published_v1 p));
    END IF;
    RETURN EXISTS (SELECT FROM cdc_invalidator.published_v1 p
                   WHERE NOT EXISTS (SELECT FROM pg_publication pub
                                     WHERE pub.pubname = p.publication))
        OR EXISTS (
            SELECT FROM pg_event_trigger_ddl_commands() d
            LEFT JOIN pg_publication_rel pr
              ON d.classid = 'pg_catalog.pg_publication_rel'::regclass AND pr.oid = d.objid
            LEFT JOIN pg_publication_namespace pn
              ON d.classid = 'pg_catalog.pg_publication_namespace'::regclass AND pn.oid = d.objid
            JOIN pg_publication pub
              ON pub.oid = CASE WHEN d.classid = 'pg_catalog.pg_publication'::regclass
                                THEN d.objid ELSE coalesce(pr.prpubid, pn.pnpubid) END
            WHERE pub.pubname IN (SELECT p.publication FROM cdc_invalidator.published_v1 p));
END
$touched$;
DROP FUNCTION IF EXISTS cdc_invalidator.publication_touched_v1();  -- (without `event`)

-- refuse_drift_v1(drift): the guard's refusal of a command that leaves `drift`
-- (publication_drift_v1()); nothing for NULL.
CREATE OR REPLACE FUNCTION cdc_invalidator.refuse_drift_v1(drift text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $refuse$
BEGIN
    IF drift IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_invalidator: refused, for after this %', drift
            USING DETAIL = 'Changes the publication does not carry are not invalidated, and '
                           'writes it does not cover fail.',
                  HINT = 'The publication follows the configuration: change that and run '
                         '`cdc-invalidator install`; see docs/DBA.md, "Logical mode".',
                  ERRCODE = 'object_in_use';
    END IF;
END
$refuse$;

-- ddl_guard(): after each ALTER TABLE or CREATE TABLE in this database, keep every
-- configured table publishable without breaking a write, or refuse the DDL:
--   * a table that left the publication (DROP COLUMN ... CASCADE of a listed column
--     removes it) would no longer be captured: refused;
--   * a table (or a new partition) that lost its replica identity, or whose identity no
--     longer covers the key columns (with a column filter: every column), gets REPLICA
--     IDENTITY FULL as install would
--     (for replica_identity = "keep", refused at COMMIT if still without one);
--   * a table whose column list no longer covers its identity's columns is republished
--     with them (a list must cover the identity, or UPDATE and DELETE fail): whole for
--     REPLICA IDENTITY FULL, with the new columns after a wider primary key or identity
--     index.
-- And after each ALTER, CREATE or DROP PUBLICATION that may touch ours
-- (publication_touched_v1()), refuse one that leaves changes of the configured tables
-- unpublished, or fails their writes (publication_drift_v1()), or renames or drops ours:
-- the publication follows the configuration.
-- Its work is our own catalog look-ups: no cost to writes. install marks its own
-- transaction (installing_v1(), schema.sql), where it does all this itself.
-- It fires for every role's ALTER TABLE and CREATE TABLE (temporary tables included), so
-- it looks only at the tables the command touched, and runs as its owner (the superuser
-- who installed it): a role with no privilege on our schema must keep its DDL working.
CREATE OR REPLACE FUNCTION cdc_invalidator.ddl_guard()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $guard$
DECLARE
    r      record;
    pub    oid;
    cols   text[];
    drift  text;
    was    text;
    marked boolean;
BEGIN
    IF cdc_invalidator.installing_v1() THEN
        RETURN;
    END IF;
    IF TG_TAG IN ('ALTER PUBLICATION', 'CREATE PUBLICATION', 'DROP PUBLICATION') THEN
        IF NOT cdc_invalidator.publication_touched_v1(TG_EVENT) THEN
            RETURN;
        END IF;
        -- Renamed or dropped: the slot cannot decode past this command (PostgreSQL reads
        -- the catalog as it was then), so every change after it would wait for good.
        SELECT format('publication %I would no longer exist, and logical capture would '
                      'stop at this command', p.publication) INTO drift
        FROM cdc_invalidator.published_v1 p
        WHERE NOT EXISTS (SELECT FROM pg_publication pub WHERE pub.pubname = p.publication)
        LIMIT 1;
        PERFORM cdc_invalidator.refuse_drift_v1(
            coalesce(drift, cdc_invalidator.publication_drift_v1()));
        RETURN;
    END IF;
    FOR r IN
        -- The configured tables the command touched: itself, or a partition of it, or an
        -- inheritance child of it that install published (its identity must stay). Found
        -- from each relation the command touched up its ancestors (a few rows of
        -- pg_inherits each), never from each published table down to its heirs: that
        -- was a call per published table and touched relation, each planned for a
        -- thousand children where a table has that many partitions (and JIT-compiled):
        -- a CREATE TABLE anywhere took seconds.
        SELECT DISTINCT p.* FROM pg_event_trigger_ddl_commands() d
        JOIN pg_class dc ON dc.oid = d.objid
        CROSS JOIN LATERAL (SELECT d.objid AS rel
                            UNION SELECT unnest(cdc_invalidator.ancestors_v1(d.objid))) up
        JOIN cdc_invalidator.published_v1 p ON p.relid::oid = up.rel
        JOIN pg_class c ON c.oid = p.relid
        WHERE d.classid = 'pg_catalog.pg_class'::regclass
          AND (up.rel = d.objid OR dc.relispartition
               OR EXISTS (SELECT FROM pg_publication_rel pr
                          JOIN pg_publication pub ON pub.oid = pr.prpubid
                          WHERE pr.prrelid = d.objid AND pub.pubname = p.publication))
    LOOP
        SELECT oid INTO pub FROM pg_publication WHERE pubname = r.publication;
        CONTINUE WHEN pub IS NULL;
        IF NOT EXISTS (SELECT FROM pg_publication_rel pr
                       WHERE pr.prpubid = pub AND pr.prrelid = r.relid) THEN
            RAISE EXCEPTION 'cdc_invalidator: this would remove table % from publication %, and '
                'its changes would no longer invalidate the cache', r.relid, r.publication
                USING HINT = 'Drop the column without CASCADE after removing it from the '
                             'configuration and running `cdc-invalidator install`; see '
                             'docs/DBA.md, "Schema migrations".',
                      ERRCODE = 'dependent_objects_still_exist';
        END IF;
        IF r.keep THEN
            -- (its identity is the DBA's: none is refused at COMMIT, any other is
            -- published for)
            PERFORM cdc_invalidator.require_identity_at_commit_v1(r.relid);
        ELSE
            -- A table with a column filter needs every old value (its UPDATEs are judged).
            SELECT coalesce(array_agg(a.attname::text), '{}') INTO cols FROM pg_attribute a
            WHERE a.attrelid = r.relid AND NOT a.attisdropped
              AND (a.attnum = ANY (r.attnums) OR (r.judge IS NOT NULL AND a.attnum > 0));
            PERFORM cdc_invalidator.ensure_replica_identity(r.relid, cols);
        END IF;
        PERFORM cdc_invalidator.require_publishable(r.relid);
        -- A column list that no longer covers the identity (FULL: every column; else
        -- the primary key's or the identity index's, which a new primary key or
        -- identity index may widen past the key columns) is published afresh.
        IF EXISTS (
            SELECT FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid
            WHERE pr.prpubid = pub AND pr.prrelid = r.relid AND pr.prattrs IS NOT NULL
              AND (c.relreplident = 'f' OR EXISTS (
                  SELECT FROM pg_index i, unnest(i.indkey::int2[]) k (attnum)
                  WHERE i.indrelid = r.relid
                    AND ((c.relreplident = 'd' AND i.indisprimary)
                         OR (c.relreplident = 'i' AND i.indisreplident))
                    AND k.attnum <> ALL (pr.prattrs::int2[])))
        ) THEN
            -- One transaction: the stream never sees the table out of the publication.
            -- (Marked as install's: this guard's ALTER PUBLICATION check stands aside
            -- between the two.)
            was := current_setting('cdc_invalidator.installing', true);
            marked := cdc_invalidator.mark_install_v1();
            EXECUTE format('ALTER PUBLICATION %I DROP TABLE ONLY %s', r.publication, r.relid);
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', r.publication,
                           cdc_invalidator.publish_list(r.relid));
            PERFORM cdc_invalidator.unmark_install_v1(was, marked);
            RAISE NOTICE 'cdc_invalidator: the replica identity of % changed: publication % '
                'now carries %', r.relid, r.publication, cdc_invalidator.publish_list(r.relid);
        END IF;
        -- What the command brought into the table's tree: an UNLOGGED or foreign
        -- partition, a partition attached with its own row filter or column list, a
        -- partition's identity its own column list no longer covers.
        PERFORM cdc_invalidator.refuse_drift_v1(cdc_invalidator.publication_drift_v1(r.relid));
    END LOOP;
END
$guard$;

-- A keep table's identity is required when its transaction commits, not after each of
-- its statements: a migration may replace the primary key in two statements, and
-- `pg_restore --clean --single-transaction` drops the key, then the table. The guard
-- notes a table left without one here; a deferred constraint trigger looks again at
-- COMMIT (or at SET CONSTRAINTS ... IMMEDIATE) and refuses it if it is still without,
-- or removes the note. ALWAYS: it must also fire under session_replication_role =
-- replica, as the guard does.
CREATE TABLE IF NOT EXISTS cdc_invalidator.identity_due_v1 (
    relid oid NOT NULL,
    xid   xid8 NOT NULL DEFAULT pg_current_xact_id()
);

CREATE OR REPLACE FUNCTION cdc_invalidator.identity_due_check_v1()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $due$
BEGIN
    DELETE FROM cdc_invalidator.identity_due_v1 WHERE relid = NEW.relid AND xid = NEW.xid;
    -- (dropped since, or no longer configured as kept: nothing to require)
    IF EXISTS (SELECT FROM cdc_invalidator.published_v1 p JOIN pg_class c ON c.oid = p.relid
               WHERE p.relid::oid = NEW.relid AND p.keep) THEN
        PERFORM cdc_invalidator.require_replica_identity(NEW.relid::regclass);
    END IF;
    RETURN NULL;
END
$due$;

DO $due_trigger$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'cdc_invalidator_identity_due'
                     AND tgrelid = 'cdc_invalidator.identity_due_v1'::regclass) THEN
        CREATE CONSTRAINT TRIGGER cdc_invalidator_identity_due
            AFTER INSERT ON cdc_invalidator.identity_due_v1
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
            EXECUTE FUNCTION cdc_invalidator.identity_due_check_v1();
        ALTER TABLE cdc_invalidator.identity_due_v1
            ENABLE ALWAYS TRIGGER cdc_invalidator_identity_due;
    END IF;
END
$due_trigger$;

-- require_identity_at_commit_v1(table): a kept table (or a partition of it) without an
-- identity now is noted, once per transaction, for the check at COMMIT above.
CREATE OR REPLACE FUNCTION cdc_invalidator.require_identity_at_commit_v1(tbl regclass)
RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $at_commit$
    INSERT INTO cdc_invalidator.identity_due_v1 (relid)
    SELECT tbl WHERE cdc_invalidator.without_replica_identity_v1(tbl) IS NOT NULL
      AND NOT EXISTS (SELECT FROM cdc_invalidator.identity_due_v1 d
                      WHERE d.relid = tbl::oid AND d.xid = pg_current_xact_id());
$at_commit$;

-- index_dropped_v1() (sql_drop, of every command that drops an index): a table whose REPLICA IDENTITY USING
-- INDEX named the index dropped has no identity left (PostgreSQL treats it as NOTHING),
-- and, published, every UPDATE and DELETE of it fails ("does not have a replica identity
-- and publishes updates"; measured on 18.6). DROP INDEX is no ALTER TABLE, which the
-- guard above sees: here each published table (or partition or child of one) left so
-- gets what the guard gives a table that lost its identity: REPLICA IDENTITY FULL, and
-- its column list republished whole, in the command's transaction; a `keep` table is
-- refused at COMMIT if still without one.
-- Only a table this command dropped an index of: one whose lock this transaction holds
-- as DROP INDEX takes it (ACCESS EXCLUSIVE; SHARE UPDATE EXCLUSIVE when CONCURRENTLY:
-- nothing weaker than that). The sql_drop event names the index, not its table, which
-- is gone from the catalog by then. A `keep` table left without identity earlier (by a
-- DROP INDEX CONCURRENTLY, below) made every later DROP INDEX anywhere in the database
-- fail at COMMIT. The lock's mode also tells CONCURRENTLY, whose earlier transactions
-- made the index unusable already (refusing its last would leave it so, the writes
-- failing): the query's text did, and a comment naming the word (`DROP INDEX i --
-- not concurrently`) took the refusal away.
CREATE OR REPLACE FUNCTION cdc_invalidator.index_dropped_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $index_dropped$
DECLARE
    r      record;
    cols   text[];
    was    text;
    marked boolean;
BEGIN
    -- (any command: an index goes with what it depends on, DROP COLLATION ... CASCADE
    -- of a collation one of its columns names, DROP OPERATOR CLASS, DROP EXTENSION ...
    -- CASCADE, and the table stays. Most drop no index, and stop here.)
    IF NOT EXISTS (SELECT FROM pg_event_trigger_dropped_objects() d
                   WHERE d.object_type = 'index') OR cdc_invalidator.installing_v1() THEN
        RETURN;
    END IF;
    FOR r IN
        WITH held AS (
            SELECT l.relation, bool_or(l.mode = 'AccessExclusiveLock') AS exclusive
            FROM pg_locks l
            WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted
              AND l.database = (SELECT d.oid FROM pg_database d
                                WHERE d.datname = current_database())
              AND l.mode IN ('ShareUpdateExclusiveLock', 'ShareRowExclusiveLock',
                             'ExclusiveLock', 'AccessExclusiveLock')
            GROUP BY l.relation)
        -- (from the tables locked up their ancestors, never from each published table
        -- down its partitions: a call per published table in every DROP of an index)
        SELECT p.*, bool_or(h.exclusive) AS exclusive
        FROM held h
        JOIN pg_class c ON c.oid = h.relation
        CROSS JOIN LATERAL (SELECT h.relation AS rel
                            UNION SELECT unnest(cdc_invalidator.ancestors_v1(h.relation))) up
        JOIN cdc_invalidator.published_v1 p ON p.relid::oid = up.rel
        JOIN pg_publication pub ON pub.pubname = p.publication
        WHERE c.relkind = 'r' AND c.relpersistence <> 't'
          AND cdc_invalidator.without_replica_identity_v1(h.relation::regclass) IS NOT NULL
        GROUP BY p.relid
    LOOP
        IF r.keep THEN
            IF NOT r.exclusive THEN
                RAISE WARNING 'cdc_invalidator: table % (replica_identity = "keep") has no '
                    'replica identity now: its UPDATEs and DELETEs fail until it has one '
                    '(ALTER TABLE ... REPLICA IDENTITY)', r.relid;
            ELSE
                PERFORM cdc_invalidator.require_identity_at_commit_v1(r.relid);
            END IF;
            CONTINUE;
        END IF;
        SELECT coalesce(array_agg(a.attname::text), '{}') INTO cols FROM pg_attribute a
        WHERE a.attrelid = r.relid AND NOT a.attisdropped
          AND (a.attnum = ANY (r.attnums) OR (r.judge IS NOT NULL AND a.attnum > 0));
        PERFORM cdc_invalidator.ensure_replica_identity(r.relid, cols);
        IF EXISTS (SELECT FROM pg_publication_rel pr JOIN pg_publication pub ON pub.oid = pr.prpubid
                   WHERE pub.pubname = r.publication AND pr.prrelid = r.relid
                     AND pr.prattrs IS NOT NULL) THEN
            -- One transaction: the stream never sees the table out of the publication.
            was := current_setting('cdc_invalidator.installing', true);
            marked := cdc_invalidator.mark_install_v1();
            EXECUTE format('ALTER PUBLICATION %I DROP TABLE ONLY %s', r.publication, r.relid);
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', r.publication,
                           cdc_invalidator.publish_list(r.relid));
            PERFORM cdc_invalidator.unmark_install_v1(was, marked);
        END IF;
    END LOOP;
END
$index_dropped$;
REVOKE ALL ON FUNCTION cdc_invalidator.index_dropped_v1() FROM PUBLIC;

-- Event triggers are for superusers only: installed by another role, there is no guard
-- (and no column lists, see publish_list()); `check` says so. ALWAYS: DDL run with
-- session_replication_role = replica is guarded too.
DO $guard_install$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        -- (made by an earlier release with fewer commands: made again)
        IF EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_guard'
                     AND evttags IS DISTINCT FROM ARRAY['ALTER TABLE', 'CREATE TABLE',
                         'CREATE FOREIGN TABLE', 'ALTER PUBLICATION', 'CREATE PUBLICATION',
                         'DROP PUBLICATION']) THEN
            DROP EVENT TRIGGER cdc_invalidator_guard;
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_guard') THEN
            CREATE EVENT TRIGGER cdc_invalidator_guard ON ddl_command_end
                WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'CREATE FOREIGN TABLE',
                             'ALTER PUBLICATION', 'CREATE PUBLICATION', 'DROP PUBLICATION')
                EXECUTE FUNCTION cdc_invalidator.ddl_guard();
        END IF;
        -- What a command drops of a publication, ddl_command_end does not name
        -- (ALTER PUBLICATION ... DROP TABLE, DROP PUBLICATION): sql_drop does.
        IF NOT EXISTS (SELECT FROM pg_event_trigger
                       WHERE evtname = 'cdc_invalidator_guard_drops') THEN
            CREATE EVENT TRIGGER cdc_invalidator_guard_drops ON sql_drop
                WHEN TAG IN ('ALTER PUBLICATION', 'DROP PUBLICATION')
                EXECUTE FUNCTION cdc_invalidator.ddl_guard();
        END IF;
        -- (made again where an earlier release made it for DROP INDEX alone)
        IF EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_guard_index'
                     AND evttags IS NOT NULL) THEN
            DROP EVENT TRIGGER cdc_invalidator_guard_index;
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger
                       WHERE evtname = 'cdc_invalidator_guard_index') THEN
            CREATE EVENT TRIGGER cdc_invalidator_guard_index ON sql_drop
                EXECUTE FUNCTION cdc_invalidator.index_dropped_v1();
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger
            WHERE evtname = 'cdc_invalidator_guard_index') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_guard_index ENABLE ALWAYS;
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger
            WHERE evtname = 'cdc_invalidator_guard_drops') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_guard_drops ENABLE ALWAYS;
        END IF;
        IF (SELECT evtenabled FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_guard') <> 'A' THEN
            ALTER EVENT TRIGGER cdc_invalidator_guard ENABLE ALWAYS;
        END IF;
    END IF;
END
$guard_install$;

REVOKE ALL ON FUNCTION cdc_invalidator.ensure_replica_identity(regclass, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.require_replica_identity(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.without_replica_identity_v1(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.require_identity_at_commit_v1(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.identity_due_check_v1() FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.require_publishable(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.restore_replica_identity(regclass[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.publish(name, regclass[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.ddl_guard() FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.refuse_drift_v1(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.record_published(regclass, text, text, text[], boolean, name)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.record_filter(regclass, text, text[], boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.cover_identity_v1(regclass, regclass, text[], boolean, text) FROM PUBLIC;
