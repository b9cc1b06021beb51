-- Where this database's writers may commit without waiting for their WAL to be flushed
-- (synchronous_commit = off; every other value flushes locally first): such a commit is
-- visible to readers before it is durable, and a crash of PostgreSQL loses it after a
-- reader may have cached its row. Neither capture mode sees it (its queue row goes with
-- it; logical decoding reads flushed WAL only): `check` warns, and the listener sweeps
-- after a crash where this names a place (sweep_after_crash = "auto"), reading it with
-- its session's own setting put back to the one it started with (capture/lineage.py).
--
-- Answers one row per place that turns it off, as the SQL that did:
--   * the server's configuration, read through this session (pg_settings), where it
--     reaches this database's sessions (below);
--   * ALTER DATABASE ... SET, ALTER ROLE ... SET, and both (pg_db_role_setting, readable
--     by any role), for this database or all.
-- A session's own SET is visible to no other session.
--
-- A session starts with the first of: its role's setting in this database, its role's,
-- this database's, every role's (ALTER ROLE ALL), the server's configuration. Where
-- this database or every role has one, the server's reaches none of this database's
-- sessions. Elsewhere a setting of this session's own role (or its client's startup
-- options) hides the server's value from it, which other roles' sessions still take:
-- unknown, and named as if off (a needless sweep after a crash costs a cold cache; a
-- missing one, values cached for good).
SELECT CASE WHEN p.source IN ('user', 'database user', 'client')
            THEN 'the server''s configuration, which this session''s own ' || p.source
                 || ' setting hides (unknown, so counted as off)'
            ELSE 'the server''s configuration (' || p.source || ')'  -- (configuration file, ...)
       END
FROM pg_settings p
WHERE p.name = 'synchronous_commit'
  AND (p.setting = 'off' AND p.source NOT IN ('database', 'user', 'database user', 'global',
                                               'client', 'session')
       OR p.source IN ('user', 'database user', 'client'))
  AND NOT EXISTS (
      SELECT FROM pg_db_role_setting s CROSS JOIN LATERAL unnest(s.setconfig) AS c(setting)
      WHERE s.setrole = 0
        AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
        AND lower(c.setting) LIKE 'synchronous_commit=%')
UNION ALL
SELECT CASE
           WHEN s.setrole = 0 AND s.setdatabase = 0 THEN 'ALTER ROLE ALL'
           WHEN s.setrole = 0 THEN 'ALTER DATABASE ' || quote_ident(current_database())
           WHEN s.setdatabase = 0 THEN 'ALTER ROLE ' || quote_ident(r.rolname)
           ELSE 'ALTER ROLE ' || quote_ident(r.rolname)
                || ' IN DATABASE ' || quote_ident(current_database())
       END
FROM pg_db_role_setting s
LEFT JOIN pg_roles r ON r.oid = s.setrole
CROSS JOIN LATERAL unnest(s.setconfig) AS c(setting)
WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
  -- (a value is stored as written: any case, quoted or not; off's synonyms too)
  AND lower(c.setting) ~ '^synchronous_commit=''?(off|false|no|0)''?$'
ORDER BY 1
