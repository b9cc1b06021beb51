"""The settings that change how values print (TimeZone, DateStyle, IntervalStyle,
extra_float_digits), trigger mode: a capture function pins them only when a column it
renders needs them, since each SET clause costs every write; a key column retyped to a
type that needs them later, before install runs again, never renders with the writer's
settings: its statements sweep the table instead.

Each test reads the capture function's settings from the catalog (pg_proc.proconfig),
then writes through real PostgreSQL and checks which Redis keys are left.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import ListenerProcess, Spawn, listening, run_cli
from tests.support.sync import SYNC, install, keys, settle
from tests.support.waits import wait_until

pytestmark = pytest.mark.servers

SEARCH_PATH = "search_path=pg_catalog, pg_temp"
PINNED = [
    SEARCH_PATH,
    "TimeZone=UTC",
    "DateStyle=ISO, MDY",
    "IntervalStyle=postgres",
    "extra_float_digits=1",
]
# A writer whose session prints dates and times unlike the pinned settings.
ODD_SESSION = ("SET TimeZone = 'America/New_York'", "SET DateStyle = 'SQL, DMY'")


def settings_of(env: Env, table: str) -> list[str]:
    """The SET clauses of `table`'s capture function."""
    config = env.scalar(
        "SELECT p.proconfig FROM pg_proc p"
        " WHERE p.oid = format('cdc_invalidator.%%I()', 'capture_' || %s::regclass::oid"
        " || '_v1')::regprocedure",
        [table],
    )
    assert isinstance(config, list)
    return config


def write_as_odd_session(env: Env, *statements: str) -> None:
    with env.connect() as conn:
        for setting in ODD_SESSION:
            conn.execute(setting.encode())
        for statement in statements:
            conn.execute(statement.encode())


def drain_the_rewrites_sweep(env: Env, r: redis.Redis, listener: ListenerProcess) -> int:
    """A retype that rewrites the table (USING, or int to bigint) asks the rebuild guard
    for a sweep of its templates: let it be done, before keys are cached for what the
    test looks at. Returns how many sweeps were logged by then."""
    settle(env, r)
    swept = listener.logged("unrenderable_changes_swept")
    assert swept, "the rewrite swept"
    assert "rewritten by ALTER TABLE" in swept[-1]["reason"], swept[-1]
    return len(swept)


def next_sweep(listener: ListenerProcess, after: int) -> dict[str, Any]:
    wait_until(
        lambda: len(listener.logged("unrenderable_changes_swept")) > after,
        what="the next sweep logged",
    )
    line: dict[str, Any] = listener.logged("unrenderable_changes_swept")[after]
    return line


def test_which_types_print_alike_in_every_session(env: Env) -> None:
    env.sql(
        "CREATE TYPE mood AS ENUM ('ok');"
        "CREATE DOMAIN id1 AS bigint; CREATE DOMAIN id2 AS id1;"
        "CREATE DOMAIN at1 AS timestamptz; CREATE DOMAIN at2 AS at1;"
        "CREATE TYPE pair AS (a int, b int)"
    )
    install(env, {})
    alike = [
        "int2", "int4", "int8", "numeric", "text", "varchar(9)", "char(3)", "name",
        "uuid", "bool", "oid", "mood", "id1", "id2",
    ]  # fmt: skip
    unlike = [
        "timestamptz", "timestamp", "date", "time", "timetz", "interval", "float4",
        "float8", "int4[]", "text[]", "int4range", "pair", "json", "at1", "at2", "money",
    ]  # fmt: skip
    probe = "SELECT cdc_invalidator.prints_alike_probe_v1(NULL::{})"
    for name in alike:
        assert env.scalar("SELECT cdc_invalidator.prints_alike_v1(%s::regtype)", [name]), name
        # The probe a capture function plans plans for exactly those types.
        assert env.scalar(probe.format(name)) is True, name
    for name in unlike:
        assert not env.scalar("SELECT cdc_invalidator.prints_alike_v1(%s::regtype)", [name]), name
        with pytest.raises(psycopg.errors.UndefinedFunction):
            env.scalar(probe.format(name))


def test_a_table_keyed_by_int_and_text_pins_nothing_but_search_path(env: Env) -> None:
    env.sql(
        "CREATE TYPE mood AS ENUM ('ok', 'meh');"
        "CREATE TABLE users (id int PRIMARY KEY, email text, mood mood, at timestamptz);"
        "INSERT INTO users VALUES (1, 'a@x', 'ok', now()), (2, 'b@x', 'ok', now())"
    )
    config = install(env, {"public.users": ["user:{id}", "user:email:{email}:{mood}"]})
    assert settings_of(env, "users") == [SEARCH_PATH]
    r = env.redis()
    r.mset({"user:1": "-", "user:email:a@x:ok": "-", "user:2": "-", "user:email:b@x:ok": "-"})
    r.set("user:email:new@x:meh", "-")
    with listening(config):
        write_as_odd_session(env, "UPDATE users SET email = 'new@x', mood = 'meh' WHERE id = 1")
        settle(env, r)
    assert keys(r) == {"user:2", "user:email:b@x:ok"}


def test_a_key_that_may_hold_bytea_pins_bytea_output_too(env: Env) -> None:
    """bytea_output changes how a bytea prints (hex, or escape): pinned where a rendered
    column may hold one, and only there (one setting more costs every statement)."""
    env.sql(
        "CREATE TABLE blobs (id int PRIMARY KEY, h bytea, at timestamptz, hs bytea[]);"
        "INSERT INTO blobs VALUES (1, '\\x00ff', now(), '{}')"
    )
    install(env, {"public.blobs": ["blob:{h}"]})
    assert settings_of(env, "blobs") == [*PINNED, "bytea_output=hex"]
    install(env, {"public.blobs": ["blob:{hs}"]})
    assert settings_of(env, "blobs") == [*PINNED, "bytea_output=hex"]
    install(env, {"public.blobs": ["blob:{at}"]})
    assert settings_of(env, "blobs") == PINNED


def test_a_timestamptz_key_is_pinned_and_renders_in_utc_iso(env: Env) -> None:
    env.sql(
        "CREATE TABLE events (id int PRIMARY KEY, at timestamptz);"
        "INSERT INTO events VALUES (1, '2024-05-01 12:00:00.5+00'), (2, '2024-05-02 12:00+00')"
    )
    config = install(env, {"public.events": ["event:{at}"]})
    assert settings_of(env, "events") == PINNED
    r = env.redis()
    r.mset(
        {
            "event:2024-05-01 12:00:00.5+00": "-",
            "event:2024-06-01 00:00:00+00": "-",
            "event:2024-05-02 12:00:00+00": "spared",
        }
    )
    with listening(config):
        write_as_odd_session(
            env, "UPDATE events SET at = '2024-05-31 20:00-04' WHERE id = 1"
        )  # 2024-06-01 00:00 UTC
        settle(env, r)
    assert keys(r) == {"event:2024-05-02 12:00:00+00"}


def test_a_column_filter_comparing_a_float_or_timestamp_is_pinned(env: Env) -> None:
    """The filter compares counted columns as text: extra_float_digits = 0 would print
    two close floats alike and hide a change."""
    env.sql(
        "CREATE TABLE plain (id int PRIMARY KEY, name text, score float8, seen timestamptz);"
        "CREATE TABLE scored (id int PRIMARY KEY, name text, score float8, seen timestamptz);"
        "CREATE TABLE sync (id int PRIMARY KEY)"
    )
    config = env.config({"public.plain": ["plain:{id}"], "public.scored": ["scored:{id}"], **SYNC})
    text = config.read_text()
    for table, lines in (
        ("plain", 'ignore_columns = ["score", "seen"]'),
        ("scored", 'columns = ["score"]'),
    ):
        header = f'[tables."public.{table}"]\n'
        assert header in text
        text = text.replace(header, header + lines + "\n")
    config.write_text(text)
    assert main(["install", "--config", str(config)]) == 0
    assert settings_of(env, "plain") == [SEARCH_PATH]
    assert settings_of(env, "scored") == PINNED


def test_check_names_a_key_column_retyped_to_bytea_in_a_function_pinned_without_it(
    env: Env,
) -> None:
    """A table keyed by a timestamp and a text column: its function pins the date
    settings, not bytea_output (no column could hold a bytea). The text column retyped
    to bytea renders in the writer's bytea_output until install; check said all was
    well. It names the column and says to run install."""
    env.sql("CREATE TABLE m (id int PRIMARY KEY, at timestamptz, tok text)")
    config = install(env, {"public.m": ["m:{at}", "m:tok:{tok}"]})
    assert "bytea_output=hex" not in settings_of(env, "m")
    env.sql("ALTER TABLE m ALTER COLUMN tok TYPE bytea USING convert_to(tok, 'UTF8')")
    said = run_cli("check", "--config", str(config))
    assert said.returncode == 1
    assert "column tok was retyped to bytea since install" in said.stderr, said.stderr
    assert main(["install", "--config", str(config)]) == 0
    assert "bytea_output=hex" in settings_of(env, "m")
    assert run_cli("check", "--config", str(config)).returncode == 0


def test_a_key_retyped_to_bytea_in_a_function_pinned_without_it_sweeps_until_install(
    env: Env, spawn: Spawn
) -> None:
    """The table of the test above, written by a session with bytea_output = escape once
    its text key column is a bytea: the key would render as `m:tok:cd`, and the app's
    `m:tok:\\x6364` stayed cached. The function's probe no longer plans: each statement
    sweeps the table's templates until install pins bytea_output."""
    env.sql(
        "CREATE TABLE m (id int PRIMARY KEY, at timestamptz, tok text);"
        "INSERT INTO m VALUES (1, '2024-05-01 12:00+00', 'ab'), (2, '2024-05-02 12:00+00', 'cd');"
        "CREATE TABLE other (id int PRIMARY KEY)"
    )
    tables = {"public.m": ["m:{at}", "m:tok:{tok}"], "public.other": ["other:{id}"]}
    # No second deletes: they would sweep again after install, and take m:spared.
    config = install(env, tables, second_delete_ms=0)
    assert settings_of(env, "m") == PINNED
    r = env.redis()
    listener = spawn(config)
    with env.connect() as writer:
        writer.execute("UPDATE m SET id = id WHERE id = 1")  # the probe planned before
        settle(env, r)
        env.sql("ALTER TABLE m ALTER COLUMN tok TYPE bytea USING convert_to(tok, 'UTF8')")
        rewritten = drain_the_rewrites_sweep(env, r, listener)
        r.mset({"m:2024-05-02 12:00:00+00": "-", "m:tok:\\x6364": "-", "other:1": "-"})
        writer.execute("SET bytea_output = 'escape'")
        writer.execute("UPDATE m SET id = id WHERE id = 2")  # succeeds
    wait_until(lambda: keys(r) == {"other:1"}, what="m's templates swept")
    reason = next_sweep(listener, rewritten)["reason"]
    assert "key column tok is now of type bytea" in reason, reason
    assert "bytea_output" in reason, reason
    assert "run install" in reason, reason
    said = run_cli("check", "--config", str(config))
    assert "each statement that writes the table sweeps its templates" in said.stderr, said.stderr

    assert main(["install", "--config", str(config)]) == 0
    assert settings_of(env, "m") == [*PINNED, "bytea_output=hex"]
    r.mset({"m:2024-05-02 12:00:00+00": "-", "m:tok:\\x6364": "-", "m:spared": "-"})
    with env.connect() as writer:
        writer.execute("SET bytea_output = 'escape'")
        writer.execute("UPDATE m SET id = id WHERE id = 2")
    settle(env, r)
    assert keys(r) == {"other:1", "m:spared"}


def test_a_key_retyped_to_timestamptz_after_install_sweeps_until_install(
    env: Env, spawn: Spawn
) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x');"
        "CREATE TABLE other (id int PRIMARY KEY)"
    )
    tables = {"public.users": ["user:{id}", "user:email:{email}"], "public.other": ["other:{id}"]}
    # No second deletes: the sweep of users' templates would be done again
    # second_delete_ms after it, and could take user:spared, cached after install.
    config = install(env, tables, second_delete_ms=0)
    assert settings_of(env, "users") == [SEARCH_PATH]
    r = env.redis()
    listener = spawn(config)
    with env.connect() as writer:
        # This session has run the capture function (and planned its probe) before the
        # retype: the probe is planned again after it.
        writer.execute("UPDATE users SET email = 'a2@x' WHERE id = 1")
        settle(env, r)
        env.sql(
            "ALTER TABLE users ALTER COLUMN id TYPE timestamptz"
            " USING '2024-05-01 12:00+00'::timestamptz + id * interval '1 day'"
        )
        rewritten = drain_the_rewrites_sweep(env, r, listener)
        r.mset({"user:2024-05-03 12:00:00+00": "-", "user:email:b@x": "-", "other:1": "-"})
        for setting in ODD_SESSION:
            writer.execute(setting.encode())
        writer.execute("UPDATE users SET email = 'b2@x' WHERE email = 'b@x'")  # succeeds
    # The key would render in the writer's zone and style: every key of users is swept.
    wait_until(lambda: keys(r) == {"other:1"}, what="users' templates swept")
    line = next_sweep(listener, rewritten)
    assert line["table"] == "public.users"
    assert "key column id is now of type timestamp with time zone" in line["reason"]
    assert "run install" in line["reason"]

    # install pins the settings: keys render exactly again, in UTC and ISO.
    assert main(["install", "--config", str(config)]) == 0
    assert settings_of(env, "users") == PINNED
    r.mset({"user:2024-05-03 12:00:00+00": "-", "user:email:b2@x": "-", "user:spared": "-"})
    write_as_odd_session(env, "UPDATE users SET email = 'b3@x' WHERE email = 'b2@x'")
    settle(env, r)
    assert keys(r) == {"other:1", "user:spared"}


def test_a_key_retyped_from_int_to_bigint_renders_as_before(env: Env, spawn: Spawn) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email varchar(50));"
        "INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x')"
    )
    # No second deletes: the rewrite's sweep would be done again after the keys below.
    config = install(env, {"public.users": ["user:{id}", "user:email:{email}"]}, second_delete_ms=0)
    assert settings_of(env, "users") == [SEARCH_PATH]
    r = env.redis()
    listener = spawn(config)
    with env.connect() as writer:
        writer.execute("UPDATE users SET email = 'a1@x' WHERE id = 1")
        settle(env, r)
        env.sql(
            "ALTER TABLE users ALTER COLUMN id TYPE bigint;"
            "ALTER TABLE users ALTER COLUMN email TYPE text"
        )
        rewritten = drain_the_rewrites_sweep(env, r, listener)
        r.mset({"user:1": "-", "user:email:a1@x": "-", "user:2": "-", "user:email:b@x": "-"})
        writer.execute("UPDATE users SET email = 'a2@x' WHERE id = 1")
    settle(env, r)
    # Exactly the row's keys: no sweep but the rewrite's.
    assert keys(r) == {"user:2", "user:email:b@x"}
    assert len(listener.logged("unrenderable_changes_swept")) == rewritten


def test_an_unpinned_filter_whose_counted_column_is_retyped_queues_every_update(
    env: Env,
) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text, seen timestamptz);"
        "INSERT INTO users VALUES (1, 'a@x', 'n', now()), (2, 'b@x', 'n', now());"
        "CREATE TABLE sync (id int PRIMARY KEY)"
    )
    # No second deletes: the rewrite's sweep would be done again after the keys below.
    config = env.config({"public.users": ["user:{id}"], **SYNC}, second_delete_ms=0)
    header = '[tables."public.users"]\n'
    config.write_text(config.read_text().replace(header, header + 'columns = ["name"]\n'))
    assert main(["install", "--config", str(config)]) == 0
    assert settings_of(env, "users") == [SEARCH_PATH]
    r = env.redis()
    r.mset({"user:1": "-", "user:2": "-"})
    with listening(config):
        env.sql("UPDATE users SET seen = now() WHERE id = 1")  # judged: not counted
        settle(env, r)
        assert keys(r) == {"user:1", "user:2"}
        # name now prints by the writer's extra_float_digits: the filter is off.
        env.sql("ALTER TABLE users ALTER COLUMN name TYPE float8 USING 1.5")
        settle(env, r)  # (the rewrite swept every key: cached again)
        r.mset({"user:1": "-", "user:2": "-"})
        env.sql("UPDATE users SET seen = now() WHERE id = 1")
        settle(env, r)
    assert keys(r) == {"user:2"}
