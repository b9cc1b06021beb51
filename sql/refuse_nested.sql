-- After the version check in install scripts: refuse a configuration with a table inside
-- another configured one (a partition or an inheritance child, at any depth), before
-- anything is created. Each change of such a table's rows is captured under one of the
-- two names, and the other's keys would stay cached: a configuration that loses
-- invalidations is not installed. `check` reports the same pairs (check_nested.sql).
DO $nested$
DECLARE
    r record;
BEGIN
    FOR r IN
{nested}
    LOOP
        RAISE EXCEPTION 'cdc_invalidator: table % is a partition or an inheritance child of %, '
            'and both are configured: a row of % is a row of %, but each change is captured '
            'under one of the two names, and the other''s keys would stay cached',
            r.child, r.parent, r.child, r.parent
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('configure one of them (the templates of %s may use any column '
                                '%s shares with it)', r.parent, r.child);
    END LOOP;
END
$nested$;
