-- The rebuild guard (trigger mode): two event triggers for migrations that rebuild a
-- watched table instead of altering it, which would otherwise let committed changes go
-- by uninvalidated until the next install:
--   * DROP TABLE of a watched table (or of the table that took its name) deletes every
--     row, and no trigger of the table fires: the drop queues one sweep of the table's
--     templates, in its own transaction, like a TRUNCATE.
--   * A table that takes a watched table's name (CREATE TABLE after a DROP, CREATE TABLE
--     AS, or ALTER TABLE ... RENAME TO / SET SCHEMA, as online-migration tools swap a
--     copy in) has none of our triggers: its rows are not the ones cached, and its writes
--     would not be seen. The command queues one sweep, and the table gets a stand-in:
--     statement triggers (a row trigger too on a partitioned table, which PostgreSQL
--     copies onto its partitions) that queue one sweep of the templates per transaction
--     that writes it (sweep_untriggered_v1). A cold cache, never a stale one, until
--     `install` compiles the table's capture function (watch() drops the stand-in).
-- The watched names are those the events carry (watched_v1.schema_name, table_name):
-- watched_v1 keeps a dropped table's row until install runs again.
-- Their work is a catalog look-up of the tables the command touched: no cost to writes.
-- They fire for every role's DDL and run as their owner (the superuser who installed
-- them), so that a role with no privilege on our schema keeps its DDL working; install
-- sets cdc_invalidator.installing for its own transaction, and they stand aside. A
-- stand-in that cannot be made is a WARNING, never a failed migration (`check` then
-- says the table is not watched).
CREATE OR REPLACE FUNCTION cdc_invalidator.rebuilt_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $rebuilt$
DECLARE
    r record;
BEGIN
    IF coalesce(current_setting('cdc_invalidator.installing', true), '') = 'on' THEN
        RETURN;
    END IF;
    FOR r IN
        -- Tables the command touched that now bear a watched name and carry no trigger
        -- of ours (not the watched table itself; not one that has a stand-in already,
        -- such as after the stand-in's own ALTER TABLE below).
        SELECT DISTINCT c.oid::regclass AS rel, c.relkind, w.schema_name, w.table_name
        FROM pg_event_trigger_ddl_commands() d
        JOIN pg_class c ON c.oid = d.objid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN cdc_invalidator.watched_v1 w
          ON w.schema_name = n.nspname::text AND w.table_name = c.relname::text
        WHERE d.classid = 'pg_catalog.pg_class'::regclass AND c.relkind IN ('r', 'p')
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
                -- triggers only; a row trigger reaches every partition, present or later.
                -- Its owner must be able to run the function to add partitions (watch()
                -- grants it the same).
                EXECUTE format('GRANT EXECUTE ON FUNCTION cdc_invalidator.sweep_untriggered_v1() '
                               'TO %s', (SELECT c.relowner::regrole FROM pg_class c
                                         WHERE c.oid = r.rel));
                EXECUTE format('CREATE TRIGGER cdc_invalidator_stand_in_row_v1 AFTER INSERT '
                               'OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION '
                               'cdc_invalidator.sweep_untriggered_v1(%L, %L)',
                               r.rel, r.schema_name, r.table_name);
                EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER cdc_invalidator_stand_in_row_v1',
                               r.rel);
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
END
$rebuilt$;

CREATE OR REPLACE FUNCTION cdc_invalidator.dropped_v1()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $dropped$
DECLARE
    r record;
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
END
$dropped$;

REVOKE ALL ON FUNCTION cdc_invalidator.rebuilt_v1() FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_invalidator.dropped_v1() FROM PUBLIC;

-- Event triggers are for superusers only: installed by another role, there is no guard;
-- `check` says so.
DO $rebuild_guard$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_rebuilt') THEN
            CREATE EVENT TRIGGER cdc_invalidator_rebuilt ON ddl_command_end
                WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
                EXECUTE FUNCTION cdc_invalidator.rebuilt_v1();
        END IF;
        IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_invalidator_dropped') THEN
            CREATE EVENT TRIGGER cdc_invalidator_dropped ON sql_drop
                WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
                EXECUTE FUNCTION cdc_invalidator.dropped_v1();
        END IF;
    END IF;
END
$rebuild_guard$;
