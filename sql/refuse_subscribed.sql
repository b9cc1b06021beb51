-- Trigger mode's install script, after refuse_nested.sql: refuse a configured table that
-- an enabled logical-replication subscription applies rows into, before anything is
-- created (check_subscribed.sql says which and why: its apply worker fires no statement
-- trigger, so the changes it applies would never be captured). Installing capture that
-- misses every replicated change is not done quietly. A disabled subscription applies
-- nothing now, and may be a migration's leftover kept for going back: a warning, which
-- `check` repeats, since enabling it starts the loss.
DO $subscribed$
DECLARE
    r   record;
    who text;
BEGIN
    FOR r IN
{subscribed}
    LOOP
        who := format('table %s is written by logical-replication subscription %I%s', r.table_name,
                      r.subscription, CASE WHEN r.target IS NOT NULL
                                           THEN format(' (which applies rows into %s)', r.target)
                                           ELSE '' END);
        IF r.enabled THEN
            RAISE EXCEPTION 'cdc_invalidator: %, and PostgreSQL''s apply worker fires no '
                'statement trigger: in trigger mode the changes it applies are not captured, '
                'and their keys would stay cached', who
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'use logical mode on this database (capture = "logical"): the '
                             'rows a subscription applies are in its WAL like any other write. '
                             'Or drop the subscription, or leave the table out of it (ALTER '
                             'SUBSCRIPTION ... REFRESH PUBLICATION once its publication no longer '
                             'holds it)';
        END IF;
        RAISE WARNING 'cdc_invalidator: %, which is disabled: once it is enabled, the changes '
            'it applies are not captured in trigger mode (its apply worker fires no statement '
            'trigger) and their keys stay cached. Drop it, or use logical mode (capture = "logical")',
            who;
    END LOOP;
END
$subscribed$;
