-- Refuse a server older than this script needs, before anything is created: what follows
-- would otherwise fail halfway, on a type or a catalog column the server lacks
-- (cdc_invalidator.pg.versions: xid8 and pg_snapshot need 13, logical mode's
-- publication column lists 15). `install` checks the same before it runs this script.
DO $version$
BEGIN
    IF pg_catalog.current_setting('server_version_num')::int < {oldest_num} THEN
        RAISE EXCEPTION 'cdc_invalidator: the server is PostgreSQL %: % needs PostgreSQL % or later',
            pg_catalog.current_setting('server_version'), {what}, {oldest}
            USING ERRCODE = 'feature_not_supported';
    END IF;
END
$version$;
