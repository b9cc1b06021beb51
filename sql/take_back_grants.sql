-- Last in each install: the grants on our objects that no role should hold, taken back.
-- The installing role's default privileges (ALTER DEFAULT PRIVILEGES ... GRANT ... TO
-- app) give `app` what install makes, as it makes it (REVOKE ... FROM PUBLIC does not
-- cover that), and a hand's GRANT may since.

-- payload_channel_v1 (sql/schema.sql), the NOTIFY payloads' channel name: its owner's
-- alone (GRANT SELECT ON TABLES gave a role the name, and with it LISTEN there: a
-- review).
DO $payload_channel_grants$
DECLARE
    grantee regrole;
BEGIN
    FOR grantee IN
        SELECT DISTINCT a.grantee::regrole
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'cdc_invalidator.payload_channel_v1'::regclass
          AND a.grantee <> 0 AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE ALL ON TABLE cdc_invalidator.payload_channel_v1 FROM %s', grantee);
    END LOOP;
END
$payload_channel_grants$;

-- Our SECURITY DEFINER functions run as the role that installed them: a role that may
-- call one may do what it does, whatever it may do itself (unwatch() any table, whose
-- changes then go by uncaptured; LISTEN on the payloads' channel; write the queue).
-- GRANT EXECUTE ON FUNCTIONS TO app gave `app` every one of them (a role owning a
-- watched table, so granted USAGE on the schema, could unwatch() another's). So every
-- such grant is taken back but the owner's, PUBLIC's (each script revokes or keeps that,
-- function by function), and those given on purpose: to a listener's role
-- (listeners_v1() in grants.sql) its mode's listener_functions_v1(), and notify_row_v1()
-- to the watched tables' owners (watch() gave it again just now). Trigger functions are left alone: no one can call one, and
-- PostgreSQL checks EXECUTE on sweep_untriggered_v1() as a partitioned table's owner
-- adds a partition (regrant_sweeps_v1() in schema.sql gives it on purpose).
DO $definer_grants$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT p.oid::regprocedure AS fn, a.grantee::regrole AS grantee
        FROM pg_proc p, aclexplode(p.proacl) a
        WHERE p.pronamespace = 'cdc_invalidator'::regnamespace AND p.prosecdef
          AND p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype)
          AND a.grantee <> 0 AND a.grantee <> p.proowner
          AND NOT EXISTS (SELECT FROM cdc_invalidator.listeners_v1() l
                          WHERE l.listener = a.grantee
                            AND p.oid = ANY (cdc_invalidator.listener_functions_v1(l.capture)))
          AND NOT (p.proname = 'notify_row_v1'
                   AND a.grantee IN (SELECT c.relowner FROM cdc_invalidator.watched_v1 w
                                     JOIN pg_class c ON c.oid = w.relid))
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', g.fn, g.grantee);
    END LOOP;
END
$definer_grants$;
