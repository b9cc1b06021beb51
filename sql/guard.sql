-- Before anything is created, reused or run: refuse a squatted schema. (Uninstall starts
-- with it too: it calls our functions, and a squatter's would run as the uninstaller.)
--
-- The rest of this script reuses what it finds (CREATE ... IF NOT EXISTS, CREATE OR
-- REPLACE, ALTER PUBLICATION), and what it finds runs with the installer's rights: a
-- trigger on our queue fires in every application write, our SECURITY DEFINER functions
-- run as their owner. A role that may create schemas could have put the schema, a
-- table, a function or the publication there first, with a trigger of its own: run by a
-- superuser's install, the next write would run that role's code as the superuser. So
-- this stops the transaction unless every object in schema cdc_invalidator (and the
-- publication in logical mode) belongs to the role running the script, and our tables
-- carry no trigger, rule or policy but logical mode's one trigger (we create no other).
-- The one other owner allowed: a table's capture function, capture_<oid>_v1, may
-- belong to the owner of the table with that oid (it then runs with the rights of that
-- table's owner, who may attach any trigger to that table anyway), or, once that table
-- was dropped, to a role the installer is a member of (watch() gave it to the table's
-- owner, which it requires the installer to be a member of; install drops it, and never
-- runs it).
--
-- It reads only pg_catalog, named as such, and the search_path is pinned first: nothing
-- it runs can be code that another role put in a schema of its own. Everything after it
-- names its objects with their schema. (SET LOCAL lasts until this transaction ends.)
SET LOCAL search_path = pg_catalog, pg_temp;

DO $guard$
DECLARE
    installer   oid := (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER);
    ours        oid := (SELECT n.oid FROM pg_catalog.pg_namespace n
                        WHERE n.nspname = 'cdc_invalidator');
    publication text := {publication};  -- NULL where this mode does not reuse it
    problems    text[] := ARRAY[]::text[];
    problem     record;
    culprit     record;
    seen        int := 0;
    msg         text;
    hint_text   text;
BEGIN
    FOR problem IN
        WITH owned (rank, kind, name, owner) AS (
            SELECT 0, 'schema', pg_catalog.quote_ident(n.nspname), n.nspowner
            FROM pg_catalog.pg_namespace n WHERE n.oid = ours
            UNION ALL
            SELECT 1, CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table'
                          WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view'
                          WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index'
                          WHEN 'I' THEN 'index' WHEN 'c' THEN 'type'
                          WHEN 'f' THEN 'foreign table' ELSE 'relation' END,
                   pg_catalog.format('cdc_invalidator.%I', c.relname), c.relowner
            FROM pg_catalog.pg_class c WHERE c.relnamespace = ours
            UNION ALL
            SELECT 2, CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate'
                          ELSE 'function' END,
                   p.oid::pg_catalog.regprocedure::pg_catalog.text, p.proowner
            FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = ours
              -- A table's capture function may belong to that table's owner; once the
              -- table is dropped (install then drops the function), to a role the
              -- installer is a member of, as watch() required of that owner.
              AND NOT EXISTS (
                  SELECT FROM pg_catalog.pg_class t
                  WHERE p.pronargs = 0
                    AND t.oid::pg_catalog.text
                        = pg_catalog.substring(p.proname, '^capture_([0-9]+)_v1$')
                    AND t.relkind IN ('r', 'p') AND t.relowner = p.proowner)
              AND NOT (p.pronargs = 0
                       AND p.proname OPERATOR(pg_catalog.~) '^capture_[0-9]+_v1$'
                       AND NOT EXISTS (
                           SELECT FROM pg_catalog.pg_class t
                           WHERE t.oid::pg_catalog.text
                                 = pg_catalog.substring(p.proname, '^capture_([0-9]+)_v1$'))
                       AND pg_catalog.pg_has_role(installer, p.proowner, 'MEMBER'))
            UNION ALL
            -- A relation's row type is listed with its relation, an array type with
            -- its element type.
            SELECT 3, 'type', pg_catalog.format_type(t.oid, NULL), t.typowner
            FROM pg_catalog.pg_type t
            WHERE t.typnamespace = ours AND t.typrelid = 0
              AND NOT EXISTS (SELECT FROM pg_catalog.pg_type e WHERE e.typarray = t.oid)
            UNION ALL
            SELECT 4, 'operator', o.oid::pg_catalog.regoperator::pg_catalog.text, o.oprowner
            FROM pg_catalog.pg_operator o WHERE o.oprnamespace = ours
            UNION ALL
            SELECT 4, 'collation', pg_catalog.format('cdc_invalidator.%I', c.collname), c.collowner
            FROM pg_catalog.pg_collation c WHERE c.collnamespace = ours
            UNION ALL
            SELECT 4, 'conversion', pg_catalog.format('cdc_invalidator.%I', c.conname), c.conowner
            FROM pg_catalog.pg_conversion c WHERE c.connamespace = ours
            UNION ALL
            SELECT 4, 'operator class', pg_catalog.format('cdc_invalidator.%I', c.opcname),
                   c.opcowner
            FROM pg_catalog.pg_opclass c WHERE c.opcnamespace = ours
            UNION ALL
            SELECT 4, 'operator family', pg_catalog.format('cdc_invalidator.%I', f.opfname),
                   f.opfowner
            FROM pg_catalog.pg_opfamily f WHERE f.opfnamespace = ours
            UNION ALL
            SELECT 4, 'text search configuration',
                   pg_catalog.format('cdc_invalidator.%I', c.cfgname), c.cfgowner
            FROM pg_catalog.pg_ts_config c WHERE c.cfgnamespace = ours
            UNION ALL
            SELECT 4, 'text search dictionary',
                   pg_catalog.format('cdc_invalidator.%I', d.dictname), d.dictowner
            FROM pg_catalog.pg_ts_dict d WHERE d.dictnamespace = ours
            UNION ALL
            SELECT 4, 'statistics object', pg_catalog.format('cdc_invalidator.%I', s.stxname),
                   s.stxowner
            FROM pg_catalog.pg_statistic_ext s WHERE s.stxnamespace = ours
            UNION ALL
            SELECT 5, 'publication', pg_catalog.quote_ident(b.pubname), b.pubowner
            FROM pg_catalog.pg_publication b WHERE b.pubname = publication
        )
        -- (rank, attached: code attached to our table rather than an object of another
        -- role, the role to blame, the whole sentence, its short form for the detail)
        SELECT o.rank, false AS attached, o.owner,
               pg_catalog.format('%s %s is owned by role "%s", not by the installing role "%s"',
                                 o.kind, o.name, pg_catalog.pg_get_userbyid(o.owner),
                                 pg_catalog.pg_get_userbyid(installer)) AS what,
               pg_catalog.format('%s %s (role "%s")', o.kind, o.name,
                                 pg_catalog.pg_get_userbyid(o.owner)) AS brief
        FROM owned o WHERE o.owner <> installer
        UNION ALL
        -- Code attached to our tables runs in the writes that touch them: install
        -- attaches one, logical mode's check at COMMIT of a kept table's identity
        -- (logical.sql), whose function is ours if the check of functions above passed.
        -- (Internal triggers, those of constraints, are the server's own.)
        SELECT 6, true, f.proowner,
               pg_catalog.format('table cdc_invalidator.%I carries trigger %I calling %s of role "%s", which install does not create',
                                 c.relname, g.tgname, f.oid::pg_catalog.regprocedure,
                                 pg_catalog.pg_get_userbyid(f.proowner)),
               pg_catalog.format('trigger %I on table cdc_invalidator.%I (calling %s of role "%s")',
                                 g.tgname, c.relname, f.oid::pg_catalog.regprocedure,
                                 pg_catalog.pg_get_userbyid(f.proowner))
        FROM pg_catalog.pg_trigger g
        JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
        JOIN pg_catalog.pg_proc f ON f.oid = g.tgfoid
        WHERE c.relnamespace = ours AND NOT g.tgisinternal
          AND NOT (c.relname = 'identity_due_v1' AND g.tgname = 'cdc_invalidator_identity_due'
                   AND f.pronamespace = ours AND f.proname = 'identity_due_check_v1'
                   AND f.pronargs = 0)
        UNION ALL
        SELECT 7, true, c.relowner,
               pg_catalog.format('table cdc_invalidator.%I (role "%s") carries rule %I, which install does not create',
                                 c.relname, pg_catalog.pg_get_userbyid(c.relowner), w.rulename),
               pg_catalog.format('rule %I on table cdc_invalidator.%I', w.rulename, c.relname)
        FROM pg_catalog.pg_rewrite w JOIN pg_catalog.pg_class c ON c.oid = w.ev_class
        WHERE c.relnamespace = ours
          AND NOT (c.relkind IN ('v', 'm') AND w.rulename = '_RETURN')  -- a view's query
        UNION ALL
        SELECT 8, true, c.relowner,
               pg_catalog.format('table cdc_invalidator.%I (role "%s") carries policy %I, which install does not create',
                                 c.relname, pg_catalog.pg_get_userbyid(c.relowner), y.polname),
               pg_catalog.format('policy %I on table cdc_invalidator.%I', y.polname, c.relname)
        FROM pg_catalog.pg_policy y JOIN pg_catalog.pg_class c ON c.oid = y.polrelid
        WHERE c.relnamespace = ours
        ORDER BY 1, 4
    LOOP
        seen := seen + 1;
        IF seen = 1 THEN
            culprit := problem;
        ELSIF seen <= 11 THEN
            problems := problems || problem.brief;
        END IF;
    END LOOP;
    IF seen = 0 THEN
        RETURN;
    END IF;

    -- A superuser's objects are no squatter's (a superuser may do anything anyway): the
    -- role running this is simply not the one that installed them.
    IF NOT culprit.attached
       AND (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = culprit.owner) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = pg_catalog.format(
                'cdc_invalidator: refusing to %s as role "%s": it was installed by role "%s" '
                '(%s belongs to it): run %s as "%s"', {action},
                pg_catalog.pg_get_userbyid(installer), pg_catalog.pg_get_userbyid(culprit.owner),
                culprit.brief, {action}, pg_catalog.pg_get_userbyid(culprit.owner)),
            HINT = 'What install made runs with its installer''s rights: only that role may '
                   'install over it or uninstall it.';
    END IF;
    msg := pg_catalog.format(
        'cdc_invalidator: refusing to %s: %s (%s after checking what it does)',
        {action}, culprit.what, CASE WHEN culprit.attached THEN 'drop it' ELSE 'drop or reassign it' END);
    hint_text := CASE WHEN culprit.attached THEN
            'Install creates no rule or policy on its own tables, and one trigger: they would '
            'run in the application''s writes. After review, DROP TRIGGER / DROP RULE / DROP '
            'POLICY ... ON the table, or DROP SCHEMA cdc_invalidator CASCADE and install '
            'again.'
        ELSE pg_catalog.format(
            'What install reuses runs with the installer''s rights, so it must be the '
            'installing role''s. After review: drop it (DROP SCHEMA cdc_invalidator '
            'CASCADE drops all of ours); or, if role "%1$s" is trusted (an earlier '
            'installer), run install as "%1$s", or make "%2$s" the owner: ALTER ... OWNER '
            'TO "%2$s", or REASSIGN OWNED BY "%1$s" TO "%2$s" (all of its objects in '
            'this database).',
            pg_catalog.pg_get_userbyid(culprit.owner), pg_catalog.pg_get_userbyid(installer))
        END;
    IF seen = 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege', MESSAGE = msg, HINT = hint_text;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege', MESSAGE = msg, HINT = hint_text,
        DETAIL = 'Also: ' || pg_catalog.array_to_string(problems, '; ')
                 || CASE WHEN seen > 11 THEN pg_catalog.format('; and %s more', seen - 11) ELSE '' END
                 || '.';
END
$guard$;
