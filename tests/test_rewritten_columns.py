"""Column values rewritten in place by DDL, in both capture modes: ALTER COLUMN ... SET
EXPRESSION of a stored generated column (PostgreSQL 17+) and ALTER COLUMN ... TYPE ...
USING change every row with no row change a trigger sees or decoding sends. The rebuild
guard's table_rewrite event trigger (cdc_invalidator_rewritten) sweeps the table's
templates in the command's transaction. Before it (a review, PostgreSQL 18.6), all four
cached keys of two rows stayed after either command, in both modes."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import listening
from tests.support.sync import SYNC, keys, settle

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

CACHED = {"user:1": "1", "user:email:a@x": "1", "user:2": "2", "user:email:b@x": "2"}


def cached(env: Env, ddl: str, tables: dict[str, list[str]]) -> Path:
    env.sql(ddl + "; CREATE TABLE sync (id int PRIMARY KEY)")
    path = env.config({**tables, **SYNC})
    assert main(["install", "--config", str(path)]) == 0
    return path


def left(env: Env) -> set[str]:
    return {k for k in keys(env.redis()) if not k.startswith("sync:")}


def test_set_expression_of_a_generated_key_column_sweeps(env: Env) -> None:
    if int(env.scalar("SHOW server_version_num")) < 170000:
        with pytest.raises(psycopg.errors.SyntaxError):  # no SET EXPRESSION before 17
            env.sql(
                "CREATE TABLE t (a int, b int GENERATED ALWAYS AS (a) STORED);"
                "ALTER TABLE t ALTER COLUMN b SET EXPRESSION AS (a + 1)"
            )
        return
    path = cached(
        env,
        "CREATE TABLE users (id int PRIMARY KEY, email text,"
        " le text GENERATED ALWAYS AS (lower(email)) STORED);"
        "INSERT INTO users (id, email) VALUES (1, 'A@X'), (2, 'B@X')",
        {"public.users": ["user:{id}", "user:email:{le}"]},
    )
    r = env.redis()
    with listening(path):
        settle(env, r)
        r.mset(CACHED)
        env.sql("ALTER TABLE users ALTER COLUMN le SET EXPRESSION AS (upper(email))")
        settle(env, r)
        assert left(env) == set()
        # Rows changed after it have their keys deleted as before (upper now).
        r.mset({"user:1": "1", "user:email:A@X": "1"})
        env.sql("UPDATE users SET email = 'd@x' WHERE id = 1")
        settle(env, r)
        assert left(env) == set()


def test_a_retype_using_an_expression_sweeps_a_partitioned_table_once(env: Env) -> None:
    path = cached(
        env,
        "CREATE TABLE users (id int, email text, PRIMARY KEY (id)) PARTITION BY RANGE (id);"
        "CREATE TABLE users_1 PARTITION OF users FOR VALUES FROM (0) TO (2);"
        "CREATE TABLE users_2 PARTITION OF users FOR VALUES FROM (2) TO (10);"
        "CREATE TABLE other (id int PRIMARY KEY, email text);"
        "INSERT INTO users VALUES (1, 'A@X'), (2, 'B@X'); INSERT INTO other VALUES (1, 'A')",
        {"public.users": ["user:{id}", "user:email:{email}"]},
    )
    r = env.redis()
    with listening(path):
        settle(env, r)
        r.mset(CACHED)
        # Neither an unwatched table's rewrite nor one that keeps the values sweeps.
        env.sql("ALTER TABLE other ALTER COLUMN email TYPE varchar(9) USING lower(email)")
        env.sql("ALTER TABLE users_1 SET UNLOGGED" if not env.logical else "SELECT 1")
        settle(env, r)
        assert left(env) == set(CACHED)
        env.sql("ALTER TABLE users ALTER COLUMN email TYPE varchar(9) USING lower(email)")
        settle(env, r)
        assert left(env) == set()


def test_set_expression_of_a_virtual_column_sweeps_or_is_refused(env: Env) -> None:
    """PostgreSQL 18: a virtual column's new expression changes every row's value of it
    with no rewrite (no table_rewrite event) and no row change. Trigger mode: user:1 and
    user:2 stayed cached (a review, 18.6) while `le` read 'A@X' instead of 'a@x'; the
    rebuild guard's ALTER TABLE event trigger now sweeps. Logical mode: PostgreSQL
    refuses it on a published table."""
    if int(env.scalar("SHOW server_version_num")) < 180000:
        return
    path = cached(
        env,
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text,"
        " le text GENERATED ALWAYS AS (lower(email)) VIRTUAL);"
        "INSERT INTO users (id, email) VALUES (1, 'A@X'), (2, 'B@X')",
        {"public.users": ["user:{id}"]},
    )
    r = env.redis()
    with listening(path):
        settle(env, r)
        r.mset({"user:1": "1", "user:2": "2"})
        # Another ALTER TABLE of the table sweeps nothing.
        env.sql("ALTER TABLE users ALTER COLUMN name SET DEFAULT 'x'")
        settle(env, r)
        assert left(env) == {"user:1", "user:2"}
        set_expression = "ALTER TABLE users ALTER COLUMN le SET EXPRESSION AS (upper(email))"
        if env.logical:
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="publication"):
                env.sql(set_expression)
            return
        env.sql(set_expression)
        settle(env, r)
        assert env.scalar("SELECT le FROM users WHERE id = 1") == "A@X"
        assert left(env) == set()


def test_a_session_setting_does_not_skip_the_sweep(env: Env) -> None:
    """The guard recorded the tables a transaction's rewrites had swept for in a session
    setting, cdc_invalidator.rewrite_swept, which any role can set: a session (a
    table's owner, or a function its migration runs) that set it to the table's oid
    first rewrote the table with no sweep, and all four keys stayed (PostgreSQL 15 and
    18, both modes). The record is now a row only the guard writes."""
    path = cached(
        env,
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "INSERT INTO users VALUES (1, 'A@X'), (2, 'B@X')",
        {"public.users": ["user:{id}", "user:email:{email}"]},
    )
    oid = env.scalar("SELECT 'users'::regclass::oid")
    r = env.redis()
    with listening(path):
        settle(env, r)
        r.mset(CACHED)
        with env.connect() as conn:
            conn.execute(
                "SELECT set_config('cdc_invalidator.rewrite_swept', %s, false)", [f",{oid},"]
            )
            conn.execute("ALTER TABLE users ALTER COLUMN email TYPE varchar(9) USING lower(email)")
        assert env.scalar("SELECT email FROM users WHERE id = 1") == "a@x"
        settle(env, r)
        assert left(env) == set()


def test_an_unwatched_tables_rewrite_does_not_expand_every_watched_table(env: Env) -> None:
    """Every rewrite in the database fires the guard. It found the watched tables from
    roots_v1(), which expands every one of them (a bearers_v1() call each): with 500
    watched tables, an ALTER COLUMN ... TYPE of a 10-row unwatched table took 15.2 ms
    instead of 3.0 ms with the trigger disabled (200 in a loop, PG 15, by hand). The
    table and its ancestors are looked up by oid and name first now (3.7 ms against
    3.5): roots_v1() is not called for a table we do not watch."""
    cached(
        env,
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "CREATE TABLE other (id int PRIMARY KEY, v int)",
        {"public.users": ["user:{id}"]},
    )
    with env.connect() as conn, conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        conn.execute("ALTER TABLE other ALTER COLUMN v TYPE bigint USING v + 1")
        calls = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions"
            " WHERE schemaname = 'cdc_invalidator' AND funcname = 'roots_v1'"
        ).fetchone()
        assert calls == (0,)
