-- The listener's role: least privilege (docs/DBA.md, "Privileges").
--
-- `install` runs as a role that may create the schema, triggers, the publication (the
-- watched tables' owner, or a superuser). The listener need not: it runs well as a
-- role that may only read and consume our queue (trigger mode) or stream the slot and
-- keep its bookkeeping (logical mode), and read nothing of the application's tables.
-- As the installing role (or a superuser), once per listener role and capture mode:
--
--   CREATE ROLE cdc_listener LOGIN PASSWORD '...';
--   -- logical mode also: ALTER ROLE cdc_listener REPLICATION;
--   --   (Amazon RDS / Aurora: GRANT rds_replication TO cdc_listener;
--   --    Cloud SQL: ALTER USER ... WITH REPLICATION as cloudsqlsuperuser)
--   SELECT cdc_invalidator.grant_listener('cdc_listener', 'trigger');  -- or 'logical'
--
-- Grants on our tables outlive running install again (nothing is re-created), but not
-- uninstall: after uninstall and install, after switching capture modes, or after an
-- upgrade to a new schema version, call it again.

-- listener_functions_v1(capture): the functions of ours a listener's role calls in
-- capture mode `capture`, which grant_listener() gives it, carry_grants (below) gives the
-- roles granted before an install that added one, and take_back_grants.sql leaves it:
--   schema_version(), schema_revision()  the version and revision it checks at start
--                                         (PUBLIC may call them too; said here so that
--                                         it stays true if a DBA revokes that)
--   server_lineage_v1(), server_run_v1() the server's lineage and run, which each
--                                         listener compares with what it saw last
--   database_oid_v1()                     this database's oid, which the logical listener
--                                         compares with its rows' (PUBLIC may call it too,
--                                         unless the installing role's default
--                                         privileges revoke that)
--   retired_table_v1(), mapping_eras_v1() the templates of a table its file no longer
--                                         names, or that an install replaced, which an
--                                         earlier install recorded (not PUBLIC's)
-- and in trigger mode:
--   listen_v1()                           LISTEN on the NOTIFY payloads' channel, whose
--                                         name it does not read (pg_listening_channels()
--                                         would show it to its session: docs/DBA.md)
--   note_server_v3()                      the server's lineage and run noted at each
--                                         connect, a sweep queued on another one
--                                         (SECURITY DEFINER: the only write to the queue
--                                         it may make)
CREATE OR REPLACE FUNCTION cdc_invalidator.listener_functions_v1(capture text)
RETURNS regprocedure[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $functions$
    SELECT ARRAY['cdc_invalidator.schema_version()', 'cdc_invalidator.schema_revision()',
                 'cdc_invalidator.server_lineage_v1()', 'cdc_invalidator.server_run_v1()',
                 'cdc_invalidator.database_oid_v1()', 'cdc_invalidator.retired_table_v1(text)',
                 'cdc_invalidator.mapping_eras_v1(text, jsonb, text)']::regprocedure[]
        || CASE WHEN capture = 'trigger' THEN
               ARRAY['cdc_invalidator.listen_v1()',
                     'cdc_invalidator.note_server_v3(boolean, text, boolean)']::regprocedure[]
           ELSE '{}' END
$functions$;
REVOKE ALL ON FUNCTION cdc_invalidator.listener_functions_v1(text) FROM PUBLIC;

-- listeners_v1(): the roles granted a capture mode (UPDATE on listener_state_v1:
-- grant_listener's trigger set; on slot_state_v1: its logical set), with the mode.
CREATE OR REPLACE FUNCTION cdc_invalidator.listeners_v1()
RETURNS TABLE (listener regrole, capture text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $listeners$
    SELECT a.grantee::regrole,
           CASE WHEN c.relname = 'listener_state_v1' THEN 'trigger' ELSE 'logical' END
    FROM pg_class c, aclexplode(c.relacl) a
    WHERE c.oid IN ('cdc_invalidator.listener_state_v1'::regclass,
                    to_regclass('cdc_invalidator.slot_state_v1'))
      AND a.privilege_type = 'UPDATE' AND a.grantee <> 0 AND a.grantee <> c.relowner
$listeners$;
REVOKE ALL ON FUNCTION cdc_invalidator.listeners_v1() FROM PUBLIC;

-- grant_listener(role, capture): give `role` exactly what `cdc-invalidator run` needs
-- in capture mode `capture` ('trigger' or 'logical'), plus what the read-only commands
-- `status`, `check` and `replay` read, and nothing else on our objects: whatever the
-- role had on our tables and sequences is revoked first, so calling it again after a
-- switch of modes leaves only the new mode's set. Needs no privilege on the watched
-- tables: triggers (SECURITY DEFINER) write the queue, the WAL sender decodes.
-- Things it does not grant, since they are not ours: CONNECT on the database (PUBLIC
-- has it unless revoked: a NOTICE says when the role lacks it) and REPLICATION.
-- SECURITY INVOKER: only the role that owns our objects (or a superuser) can grant on
-- them, and only it may call this.
CREATE OR REPLACE FUNCTION cdc_invalidator.grant_listener(listener regrole, capture text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $grant$
DECLARE
    grants text[];
    g      text;
    f      regprocedure;
BEGIN
    IF listener = (SELECT nspowner FROM pg_namespace WHERE nspname = 'cdc_invalidator') THEN
        -- Revoking first would take the owner's own privileges away.
        RAISE EXCEPTION 'cdc_invalidator.grant_listener: role % owns cdc_invalidator and needs no grants',
            listener USING ERRCODE = 'invalid_grant_operation';
    END IF;
    IF capture = 'trigger' THEN
        grants := ARRAY[
            -- the windows read, replay's history, status; processed rows pruned
            'SELECT, DELETE ON TABLE cdc_invalidator.queue_v1',
            -- its position: read at start, saved as it goes
            'SELECT, UPDATE ON TABLE cdc_invalidator.listener_state_v1',
            -- each save's snapshot and time, for replay: written with the position,
            -- pruned (the newest old row found first), read back
            'SELECT, INSERT, DELETE ON TABLE cdc_invalidator.progress_v1',
            -- INSERT ... ON CONFLICT (id) DO UPDATE: a dead letter parked twice
            'SELECT, INSERT, UPDATE ON TABLE cdc_invalidator.dead_letter_v1',
            -- check: the columns each table's triggers copy
            'SELECT ON TABLE cdc_invalidator.watched_v1'];
    ELSIF capture = 'logical' THEN
        IF to_regclass('cdc_invalidator.slot_state_v1') IS NULL THEN
            RAISE EXCEPTION 'cdc_invalidator.grant_listener: logical capture is not installed here'
                USING HINT = 'Run `cdc-invalidator install` with capture = "logical" first.',
                      ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        grants := ARRAY[
            -- the slot's saved position and a sweep owed (a row per slot, added on first use)
            'SELECT, INSERT, UPDATE ON TABLE cdc_invalidator.slot_state_v1',
            -- the configured tables by relid and column number, read at start
            'SELECT ON TABLE cdc_invalidator.published_v1',
            -- what was invalidated, for replay: written per batch, pruned, read back
            'SELECT, INSERT, DELETE ON TABLE cdc_invalidator.history_v1',
            'SELECT, INSERT ON TABLE cdc_invalidator.dead_letter_v1',
            -- dead letters' negative ids (nextval)
            'USAGE ON SEQUENCE cdc_invalidator.logical_dead_letter_v1'];
    ELSE
        RAISE EXCEPTION 'cdc_invalidator.grant_listener: capture must be ''trigger'' or ''logical'', not %',
            quote_nullable(capture) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Both modes: the Redis server last written to, for replay after it changes.
    grants := grants || 'SELECT, INSERT, UPDATE ON TABLE cdc_invalidator.redis_identity_v1'::text;

    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA cdc_invalidator FROM %s', listener);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA cdc_invalidator FROM %s', listener);
    EXECUTE format('GRANT USAGE ON SCHEMA cdc_invalidator TO %s', listener);
    FOREACH g IN ARRAY grants LOOP
        EXECUTE format('GRANT %s TO %s', g, listener);
    END LOOP;
    -- Its functions (listener_functions_v1); a switch to logical mode takes the trigger
    -- listener's own away.
    FOREACH f IN ARRAY cdc_invalidator.listener_functions_v1(capture) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, listener);
    END LOOP;
    FOR f IN SELECT unnest(cdc_invalidator.listener_functions_v1('trigger'))
             EXCEPT SELECT unnest(cdc_invalidator.listener_functions_v1(capture)) LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', f, listener);
    END LOOP;

    IF NOT has_database_privilege(listener, current_database(), 'CONNECT') THEN
        RAISE NOTICE 'cdc_invalidator: role % may not connect to database %: GRANT CONNECT ON DATABASE % TO %',
            listener, current_database(), quote_ident(current_database()), listener;
    END IF;
    IF capture = 'logical'
       AND NOT (SELECT r.rolreplication OR r.rolsuper FROM pg_roles r WHERE r.oid = listener)
       -- Amazon RDS and Aurora: membership in rds_replication stands for the attribute.
       AND NOT EXISTS (SELECT FROM pg_roles r WHERE r.rolname = 'rds_replication'
                       AND pg_has_role(listener, r.oid, 'MEMBER')) THEN
        RAISE NOTICE 'cdc_invalidator: role % also needs REPLICATION to stream the slot: ALTER ROLE % REPLICATION (managed services: their replication role, e.g. GRANT rds_replication TO %)',
            listener, listener, listener;
    END IF;
END
$grant$;

REVOKE ALL ON FUNCTION cdc_invalidator.grant_listener(regrole, text) FROM PUBLIC;

-- An install that adds a table the trigger listener writes (progress_v1, revision 3), or
-- a function a listener calls (note_server_v1(), revision 6; server_run_v1(), revision 7;
-- database_oid_v1(), revision 9, which PUBLIC may call unless the installing role's
-- default privileges revoke that: a review's logical listener granted by revision 8 then
-- failed on it; retired_table_v1(), mapping_eras_v1() and listen_v1(), revision 10),
-- gives it to the roles already granted that mode (listeners_v1()), as grant_listener
-- would. So the upgrade order of docs/DBA.md (stop, install, start) needs no call in
-- between. Nothing else changes.
DO $carry_grants$
DECLARE
    l record;
    f regprocedure;
BEGIN
    FOR l IN SELECT * FROM cdc_invalidator.listeners_v1() LOOP
        IF l.capture = 'trigger' THEN
            EXECUTE format('GRANT SELECT, INSERT, DELETE ON TABLE cdc_invalidator.progress_v1 TO %s',
                           l.listener);
        END IF;
        FOREACH f IN ARRAY cdc_invalidator.listener_functions_v1(l.capture) LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, l.listener);
        END LOOP;
    END LOOP;
END
$carry_grants$;
