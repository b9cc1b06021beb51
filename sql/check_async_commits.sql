-- Where this database's writers may commit without waiting for their WAL to be flushed
-- (synchronous_commit = off; every other value flushes locally first): such a commit is
-- visible to readers before it is durable, and a crash of PostgreSQL loses it after a
-- reader may have cached its row. Neither capture mode sees it (its queue row goes with
-- it; logical decoding reads flushed WAL only): `check` warns, and the listener sweeps
-- after a crash where this names a place (sweep_after_crash = "auto"), reading it with
-- its session's own setting put back to the one it started with (capture/lineage.py).
--
-- Answers one row per place that turns it off, as the SQL that did:
--   * the server's configuration, read through this session (pg_settings), unless this
--     session's value came from elsewhere (a database's or role's setting, below, or
--     the client), which hides it;
--   * ALTER DATABASE ... SET, ALTER ROLE ... SET, and both (pg_db_role_setting, readable
--     by any role), for this database or all.
-- A session's own SET is visible to no other session.
SELECT 'the server''s configuration (' || source || ')'  -- (configuration file, command line)
FROM pg_settings
WHERE name = 'synchronous_commit' AND setting = 'off'
  AND source NOT IN ('database', 'user', 'database user', 'client', 'session')
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
