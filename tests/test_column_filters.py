"""Column filters (`ignore_columns`, `columns`): which UPDATEs invalidate, in both capture
modes, on real PostgreSQL and Redis.

Each test changes rows, then settles (tests/support/sync.py: a later change to `sync`
was handled, and with it everything committed before), and only then looks at what is
left in Redis: a key the filter spared is still there because its change was judged,
not because the listener had not got to it yet.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import listening
from tests.support.sync import SYNC, keys, settle
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

USER_KEYS = ["user:{id}", "user:email:{email}"]


def users(env: Env, rows: int = 3, key: str = "PRIMARY KEY") -> None:
    env.sql(
        f"CREATE TABLE users (id int {key}, email text, name text, "
        "last_seen_at timestamptz, logins int NOT NULL DEFAULT 0, doc json, spot point)"
    )
    env.sql(
        "INSERT INTO users (id, email, name) "
        f"SELECT g, 'u' || g || '@x', 'name ' || g FROM generate_series(1, {rows}) g"
    )
    if env.scalar("SELECT to_regclass('public.sync')") is None:
        env.sql("CREATE TABLE sync (id int PRIMARY KEY)")


def configure(env: Env, table_lines: str, table: str = "public.users") -> Path:
    """A config whose `table` section also holds `table_lines` (TOML)."""
    config = env.config({table: USER_KEYS, **SYNC})
    header = f'[tables."{table}"]\n'
    text = config.read_text()
    assert header in text
    config.write_text(text.replace(header, header + table_lines + "\n"))
    return config


def install(env: Env, table_lines: str) -> Path:
    config = configure(env, table_lines)
    assert main(["install", "--config", str(config)]) == 0
    return config


def cache(env: Env, ids: range | list[int]) -> dict[str, str]:
    """Every key of these users, cached."""
    values = {}
    for i in ids:
        values[f"user:{i}"] = "row"
        values[f"user:email:u{i}@x"] = str(i)
    env.redis().mset(values)
    return values


def run(env: Env, config: Path, *statements: str) -> set[str]:
    """Run the statements (each its own transaction) under a listener; the keys left."""
    r = env.redis()
    with listening(config):
        for statement in statements:
            env.sql(statement)
        settle(env, r)
    return {k for k in keys(r) if not k.startswith("sync:")}


def test_an_update_of_ignored_columns_only_deletes_nothing(env: Env) -> None:
    users(env)
    config = install(env, 'ignore_columns = ["last_seen_at", "logins"]')
    cached = cache(env, range(1, 4))
    left = run(
        env,
        config,
        "UPDATE users SET last_seen_at = now(), logins = logins + 1 WHERE id = 1",
        "UPDATE users SET logins = 7",  # every row, ignored column only
    )
    assert left == set(cached)
    # A counted column (name) changes: that row's keys go, and only its.
    left = run(env, config, "UPDATE users SET name = 'Z', last_seen_at = now() WHERE id = 2")
    assert left == set(cached) - {"user:2", "user:email:u2@x"}


def test_only_listed_columns_count_with_columns(env: Env) -> None:
    users(env)
    config = install(env, 'columns = ["name"]')
    cached = cache(env, range(1, 4))
    left = run(env, config, "UPDATE users SET last_seen_at = now(), logins = 3, doc = '{}'")
    assert left == set(cached)
    left = run(env, config, "UPDATE users SET name = 'Z' WHERE id = 1")
    assert left == set(cached) - {"user:1", "user:email:u1@x"}


@pytest.mark.parametrize("lines", ['columns = ["name"]', 'ignore_columns = ["email", "logins"]'])
def test_template_columns_always_count(env: Env, lines: str) -> None:
    """email is in a template: a change of it deletes the old and the new email's keys,
    whether columns leaves it out or ignore_columns lists it."""
    users(env)
    config = install(env, lines)
    cached = cache(env, range(1, 4))
    env.redis().set("user:email:new@x", "-")
    left = run(env, config, "UPDATE users SET email = 'new@x' WHERE id = 1")
    assert left == set(cached) - {"user:1", "user:email:u1@x"}


@pytest.mark.parametrize("lines", ["ignore_columns = []", 'columns = ["name"]'])
def test_an_update_that_changes_nothing_deletes_nothing(env: Env, lines: str) -> None:
    users(env)
    config = install(env, lines)
    cached = cache(env, range(1, 4))
    left = run(
        env,
        config,
        "UPDATE users SET name = name",
        "UPDATE users SET email = email, last_seen_at = last_seen_at WHERE id = 2",
    )
    assert left == set(cached)


def test_without_a_filter_every_update_deletes(env: Env) -> None:
    users(env)
    config = env.config({"public.users": USER_KEYS, **SYNC})
    assert main(["install", "--config", str(config)]) == 0
    cache(env, range(1, 4))
    left = run(env, config, "UPDATE users SET name = name WHERE id = 1")
    assert "user:1" not in left
    assert "user:2" in left


def test_each_row_of_a_multi_row_update_is_judged_on_its_own(env: Env) -> None:
    users(env, rows=6)
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    cached = cache(env, range(1, 7))
    # Even ids get a new name, odd ones only a new last_seen_at.
    left = run(
        env,
        config,
        "UPDATE users SET last_seen_at = now(), "
        "name = CASE WHEN id % 2 = 0 THEN 'changed' ELSE name END",
    )
    assert left == set(cached) - {k for i in (2, 4, 6) for k in (f"user:{i}", f"user:email:u{i}@x")}


def test_a_primary_key_change_deletes_every_affected_key(env: Env) -> None:
    """Swapped ids: old row 1 pairs with the new row 1 (the former 2), whose values all
    differ; an id changed to a new value pairs with nothing. Every old and new key of
    each row is deleted all the same."""
    users(env, rows=4, key="PRIMARY KEY DEFERRABLE INITIALLY DEFERRED")
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    cached = cache(env, range(1, 5))
    env.redis().set("user:10", "-")
    left = run(
        env,
        config,
        "UPDATE users SET id = CASE id WHEN 1 THEN 2 ELSE 1 END WHERE id IN (1, 2)",
        "UPDATE users SET id = 10, last_seen_at = now() WHERE id = 3",
    )
    gone = {"user:1", "user:2", "user:3", "user:10", "user:email:u1@x", "user:email:u2@x"}
    gone.add("user:email:u3@x")
    assert left == set(cached) - gone


def test_insert_delete_and_truncate_always_invalidate(env: Env) -> None:
    users(env)
    config = install(env, 'ignore_columns = ["last_seen_at", "name"]')
    cached = cache(env, range(1, 4))
    env.redis().mset({"user:9": "-", "user:email:u9@x": "-"})
    left = run(
        env,
        config,
        "INSERT INTO users (id, email, name) VALUES (9, 'u9@x', 'n')",
        "DELETE FROM users WHERE id = 1",
    )
    assert left == set(cached) - {"user:1", "user:email:u1@x"}
    left = run(env, config, "TRUNCATE users")
    assert left == set()


def test_values_of_types_without_equality_are_judged(env: Env) -> None:
    """json and point have no equality operator: their text is compared."""
    users(env)
    env.sql("UPDATE users SET doc = '{\"a\": 1}', spot = point(1, 2)")
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    cached = cache(env, range(1, 4))
    left = run(
        env,
        config,
        "UPDATE users SET doc = '{\"a\": 1}', spot = point(1, 2), last_seen_at = now()",
    )
    assert left == set(cached)
    left = run(
        env,
        config,
        "UPDATE users SET doc = '{\"a\": 2}' WHERE id = 1",
        "UPDATE users SET spot = point(3, 4) WHERE id = 2",
    )
    assert left == set(cached) - {"user:1", "user:email:u1@x", "user:2", "user:email:u2@x"}


def test_an_unchanged_large_value_is_judged_unchanged(env: Env) -> None:
    """A TOASTed value the UPDATE left alone (logical mode: sent as 'unchanged')."""
    users(env)
    env.sql("UPDATE users SET name = repeat(md5(id::text), 20000)")
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    cached = cache(env, range(1, 4))
    left = run(env, config, "UPDATE users SET last_seen_at = now()")
    assert left == set(cached)
    left = run(env, config, "UPDATE users SET name = name || 'x' WHERE id = 3")
    assert left == set(cached) - {"user:3", "user:email:u3@x"}


def test_a_table_without_primary_key_is_not_judged(env: Env) -> None:
    env.sql("CREATE TABLE users (id int, email text, last_seen_at timestamptz)")
    env.sql("INSERT INTO users (id, email) VALUES (1, 'u1@x'), (2, 'u2@x')")
    env.sql("CREATE TABLE sync (id int PRIMARY KEY)")
    if env.logical:
        env.sql("ALTER TABLE users REPLICA IDENTITY FULL")
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    cache(env, range(1, 3))
    left = run(env, config, "UPDATE users SET last_seen_at = now() WHERE id = 1")
    if env.logical:
        # Each U message is one row with its old values: judged without a key.
        assert "user:1" in left
    else:
        # Nothing to pair old and new rows by: every UPDATE invalidates.
        assert "user:1" not in left
    assert "user:2" in left


# --- configuration and check -------------------------------------------------------------


def test_both_settings_are_a_configuration_error_naming_the_table(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    users(env)
    config = configure(env, 'ignore_columns = ["logins"]\ncolumns = ["name"]')
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tables.public.users" in err
    assert "mutually exclusive" in err


@pytest.mark.parametrize("setting", ["ignore_columns", "columns"])
def test_a_wrong_column_name_is_refused_by_check_and_install(
    env: Env, capsys: pytest.CaptureFixture[str], setting: str
) -> None:
    users(env)
    # Names as the catalog stores them: "Logins" is not logins.
    config = configure(env, f'{setting} = ["Logins"]')
    assert main(["install", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "Logins" in err
    assert "public.users" in err
    config = configure(env, 'ignore_columns = ["logins"]')
    assert main(["install", "--config", str(config)]) == 0
    config = configure(env, f'{setting} = ["Logins"]')
    assert main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{setting} lists column 'Logins', which table public.users does not have" in err


def test_check_warns_of_an_ignored_template_column_and_a_missing_key(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    users(env)
    env.sql("CREATE TABLE events (id int, email text)")
    config = env.config({"public.users": USER_KEYS, "public.events": ["event:{id}"], **SYNC})
    text = config.read_text()
    text = text.replace(
        '[tables."public.users"]\n', '[tables."public.users"]\nignore_columns = ["email"]\n'
    )
    text = text.replace('[tables."public.events"]\n', '[tables."public.events"]\ncolumns = []\n')
    config.write_text(text)
    if env.logical:
        env.sql("ALTER TABLE events REPLICA IDENTITY FULL")
    assert main(["install", "--config", str(config)]) == 0
    main(["check", "--config", str(config)])
    out = capsys.readouterr().out
    assert "ignore_columns lists 'email', which template" in out
    if env.logical:
        assert "REPLICA IDENTITY FULL" in out
    else:
        assert "public.events has no primary key" in out


# --- migrations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE users DROP COLUMN name",
        "ALTER TABLE users RENAME COLUMN name TO full_name",
        "ALTER TABLE users DROP COLUMN last_seen_at",
        "ALTER TABLE users ADD COLUMN nickname text",
    ],
)
@pytest.mark.parametrize("lines", ['ignore_columns = ["last_seen_at"]', 'columns = ["name"]'])
def test_a_migration_of_filter_columns_never_fails_a_write_nor_loses_a_change(
    env: Env, ddl: str, lines: str
) -> None:
    users(env)
    config = install(env, lines)
    cache(env, range(1, 4))
    env.sql(ddl)
    columns = {
        str(c)
        for (c,) in _rows(
            env,
            "SELECT attname FROM pg_attribute WHERE attrelid = 'users'::regclass "
            "AND attnum > 0 AND NOT attisdropped",
        )
    }
    # A change of every column the table still has: none may be lost.
    changed = [c for c in ("name", "full_name", "nickname") if c in columns]
    statements = [f"UPDATE users SET {c} = 'changed {c}' WHERE id = 1" for c in changed]
    left = run(env, config, *statements, "UPDATE users SET logins = 5 WHERE id = 2")
    if changed:
        assert "user:1" not in left
    # logins counts with ignore_columns, and does not with columns, unless the listed
    # column is gone: then the filter is off (every UPDATE invalidates) until install.
    assert ("user:2" in left) == (lines.startswith("columns") and "name" in columns)
    assert "user:3" in left


def _rows(env: Env, query: str) -> list[tuple[object, ...]]:
    with env.connect() as conn:
        return conn.execute(query.encode()).fetchall()


def test_the_listener_waits_for_nothing_skipped(env: Env) -> None:
    """A transaction whose every change was judged unchanged still lets the listener
    move on (its position acknowledged in logical mode)."""
    users(env)
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    r = env.redis()
    r.set("user:1", "row")
    with listening(config):
        for _ in range(5):
            env.sql("UPDATE users SET last_seen_at = now()")
        env.sql("UPDATE users SET name = 'x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1") == 0, what="the counted change")
        settle(env, r)


# What a DBA does to a filtered table: the judged capture (trigger mode) or the judging
# decoder (logical mode) must never fail the write nor let the change pass unseen. After
# each DDL, row 1's email changes (a key column) and row 2's name (a counted column):
# every key of both must go, its own or swept.
DBA_DDL = [
    "ALTER TABLE users RENAME COLUMN email TO mail",
    "ALTER TABLE users ALTER COLUMN email TYPE varchar(200)",
    "ALTER TABLE users DROP COLUMN email",
    "ALTER TABLE users RENAME TO members",
    "ALTER TABLE users ALTER COLUMN id TYPE bigint",
    "ALTER TABLE users DROP CONSTRAINT users_pkey",
]


@pytest.mark.parametrize("ddl", DBA_DDL)
def test_a_dba_migration_of_a_filtered_table_fails_no_write_and_loses_no_change(
    env: Env, ddl: str
) -> None:
    users(env)
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    cached = cache(env, range(1, 4))
    env.sql(ddl)
    table = "members" if "RENAME TO" in ddl else "users"
    email = "mail" if "TO mail" in ddl else "email"
    changes = [f"UPDATE {table} SET name = 'renamed' WHERE id = 2"]
    if "DROP COLUMN email" not in ddl:
        changes.append(f"UPDATE {table} SET {email} = 'new@x' WHERE id = 1")
    else:
        changes.append(f"UPDATE {table} SET name = 'also' WHERE id = 1")
    left = run(env, config, *changes)  # a write that failed would raise here
    for key in ("user:1", "user:email:u1@x", "user:2", "user:email:u2@x"):
        assert key not in left, (ddl, key, sorted(left))
    assert set(cached) & left <= {"user:3", "user:email:u3@x"}


def test_a_write_as_a_replica_is_judged_like_any_other(env: Env) -> None:
    """Loaders and logical-replication subscribers write with session_replication_role =
    replica: the judged capture still fires (trigger mode: ENABLE ALWAYS)."""
    users(env)
    config = install(env, 'ignore_columns = ["last_seen_at"]')
    cache(env, range(1, 4))
    left = run(
        env,
        config,
        "SET session_replication_role = replica; UPDATE users SET name = 'x' WHERE id = 1",
        "SET session_replication_role = replica; UPDATE users SET last_seen_at = now() "
        "WHERE id = 2",
    )
    assert "user:1" not in left
    assert "user:2" in left  # the ignored column's change was judged, as without replica
