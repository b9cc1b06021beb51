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
--   ensure_replica_identity(), restore_replica_identity(), publish()

CREATE TABLE IF NOT EXISTS cdc_invalidator.slot_state_v1 (
    slot_name         text PRIMARY KEY,
    acked_lsn         pg_lsn,  -- NULL until the listener first used a slot of this name
    resync_reason     text,    -- changes may have been missed: sweep, then clear
    last_processed_at timestamptz,
    events_processed  bigint NOT NULL DEFAULT 0
);

CREATE SEQUENCE IF NOT EXISTS cdc_invalidator.logical_dead_letter_v1;

-- What the listener invalidated recently, for replay after Redis restores an old
-- snapshot: one row per acknowledged batch, its events' key columns as a JSON array of
-- [schema, table, op, old, new]. (Trigger mode keeps its queue rows for that instead.)
-- Pruned by the listener after replay_history.
CREATE TABLE IF NOT EXISTS cdc_invalidator.history_v1 (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    events json NOT NULL
);
CREATE INDEX IF NOT EXISTS history_v1_at ON cdc_invalidator.history_v1 (at);

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
    FOR rel IN SELECT tbl UNION SELECT p.relid FROM pg_partition_tree(tbl) p LOOP
        SELECT c.relreplident INTO ident FROM pg_class c WHERE c.oid = rel;
        CONTINUE WHEN ident = 'f';
        SELECT array_agg(a.attname::text), min(ic.relname) INTO covered, idx
        FROM pg_index i
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = rel
          AND ((ident = 'd' AND i.indisprimary) OR (ident = 'i' AND i.indisreplident));
        CONTINUE WHEN coalesce(key_columns <@ covered, false);
        INSERT INTO cdc_invalidator.replica_identity_v1 (relid, previous, previous_index)
        VALUES (rel, ident, CASE WHEN ident = 'i' THEN idx END)
        ON CONFLICT (relid) DO NOTHING;
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
        RAISE NOTICE 'cdc_invalidator: % now has REPLICA IDENTITY FULL (was %)', rel,
            CASE ident WHEN 'd' THEN 'DEFAULT' WHEN 'n' THEN 'NOTHING' ELSE 'USING INDEX ' || idx END;
    END LOOP;
END
$ensure$;

-- require_replica_identity(table): for a table whose identity install leaves alone
-- (replica_identity = "keep"): refuse one without any, since publishing it would make
-- every UPDATE and DELETE of it fail ("cannot update table ... because it does not have
-- a replica identity and publishes updates").
CREATE OR REPLACE FUNCTION cdc_invalidator.require_replica_identity(tbl regclass)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $require$
DECLARE
    rel regclass;
BEGIN
    FOR rel IN
        SELECT r.relid FROM (SELECT tbl AS relid UNION SELECT p.relid FROM pg_partition_tree(tbl) p) r
        JOIN pg_class c ON c.oid = r.relid
        WHERE c.relkind = 'r'
          AND (c.relreplident = 'n'
               OR (c.relreplident = 'd' AND NOT EXISTS (
                   SELECT FROM pg_index i WHERE i.indrelid = r.relid AND i.indisprimary)))
    LOOP
        RAISE EXCEPTION 'cdc_invalidator: table % has no replica identity: once published, its '
            'updates and deletes would fail', rel
            USING HINT = 'Give it a primary key, or set replica_identity = "full" in the '
                         'configuration so that install sets REPLICA IDENTITY FULL.',
                  ERRCODE = 'object_not_in_prerequisite_state';
    END LOOP;
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
            UNION SELECT p.relid FROM unnest(keep) k, pg_partition_tree(k) p)
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

-- publish(name, tables): the publication the listener streams, holding exactly
-- `tables` (with a partitioned table, all its partitions, present and future). Each
-- partition's changes are published under its own name, which the listener maps to
-- the table the configuration names: publish_via_partition_root would be simpler, but
-- PostgreSQL then does not publish a TRUNCATE of one partition at all.
CREATE OR REPLACE FUNCTION cdc_invalidator.publish(pubname name, tables regclass[])
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $publish$
DECLARE
    list text := (SELECT string_agg(t::text, ', ') FROM unnest(tables) t);
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pg_publication.pubname = publish.pubname) THEN
        EXECUTE format('CREATE PUBLICATION %I FOR TABLE %s', pubname, list);
    ELSE
        EXECUTE format('ALTER PUBLICATION %I SET TABLE %s', pubname, list);
    END IF;
    EXECUTE format('ALTER PUBLICATION %I SET (publish = %L, publish_via_partition_root = false)',
                   pubname, 'insert, update, delete, truncate');
END
$publish$;

REVOKE ALL ON FUNCTION cdc_invalidator.ensure_replica_identity(regclass, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.require_replica_identity(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.restore_replica_identity(regclass[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.publish(name, regclass[]) FROM PUBLIC;
