"""Generated columns, where PostgreSQL 18 differs (docs/DBA.md, "Supported PostgreSQL
versions"), in both capture modes.

- A STORED generated column works as a key column on every version. On 18, a published
  table whose REPLICA IDENTITY FULL holds a generated column the publication does not
  carry refuses UPDATE and DELETE ("Replica identity must not contain unpublished
  generated columns"): install publishes stored generated columns there
  (publish_generated_columns = stored), so the writes go on.
- A VIRTUAL generated column (18 only, and 18's default kind) is not computed in a
  trigger's transition tables (18.6: read as NULL) and no publication carries it:
  install refuses one as a key column (and, in logical mode, any table that would have
  REPLICA IDENTITY FULL with one); the DDL guard refuses adding one to such a table,
  and, in trigger mode, the rebuild guard one that takes a key column's name.
  On a server before 18 these tests check that there is no such column to meet.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import listening
from tests.support.sync import SYNC, keys, settle

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

KEYS = {"public.users": ["user:{id}", "user:email:{le}"]}
VIRTUAL_LE = "le text GENERATED ALWAYS AS (lower(email)) VIRTUAL"


def has_virtual_columns(env: Env) -> bool:
    """PostgreSQL 18 and later; before, the test checks that VIRTUAL does not exist."""
    if int(env.scalar("SHOW server_version_num")) >= 180000:
        return True
    with pytest.raises(psycopg.errors.SyntaxError):
        env.sql(f"CREATE TABLE nothing_virtual (id int, email text, {VIRTUAL_LE})")
    return False


def users(env: Env, generated: str) -> None:
    env.sql(
        f"CREATE TABLE users (id int PRIMARY KEY, email text, name text, {generated});"
        "INSERT INTO users (id, email) VALUES (1, 'A@X'), (2, 'B@X');"
        "CREATE TABLE sync (id int PRIMARY KEY)"
    )


def config(env: Env, tables: dict[str, list[str]], lines: str = "") -> Path:
    """A config of `tables` and sync; `lines` (TOML) go in the users table's section."""
    path = env.config({**tables, **SYNC})
    header = '[tables."public.users"]\n'
    path.write_text(path.read_text().replace(header, header + lines + "\n"))
    return path


def install(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["install", "--config", str(path)])
    return code, capsys.readouterr().err


def test_a_stored_generated_key_column_is_invalidated_and_writes_go_on(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    users(env, "le text GENERATED ALWAYS AS (lower(email)) STORED")
    path = config(env, KEYS)
    code, err = install(path, capsys)
    assert code == 0, err
    # Before 18, logical mode sweeps the table for every change: check says so.
    main(["check", "--config", str(path)])
    warned = "generated columns, which PostgreSQL sends in logical replication only from"
    before_18 = int(env.scalar("SHOW server_version_num")) < 180000
    assert (warned in capsys.readouterr().out) == (env.logical and before_18)
    r = env.redis()
    r.mset({"user:1": "1", "user:email:a@x": "1", "user:2": "2", "user:email:b@x": "2"})
    with listening(path):
        # Both fail on 18 in logical mode unless the publication carries the column.
        env.sql("UPDATE users SET email = 'C@X' WHERE id = 1")
        env.sql("DELETE FROM users WHERE id = 2")
        settle(env, r)
    assert {k for k in keys(r) if not k.startswith("sync:")} == set()
    if env.logical and int(env.scalar("SHOW server_version_num")) >= 180000:
        assert env.scalar("SELECT pubgencols FROM pg_publication") == "s"


def test_install_refuses_a_virtual_generated_key_column(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    if not has_virtual_columns(env):
        return
    users(env, VIRTUAL_LE)
    code, err = install(config(env, KEYS), capsys)
    assert code == 1
    assert "install failed, nothing was changed" in err
    if env.logical:
        assert (
            "table public.users has REPLICA IDENTITY FULL and the virtual generated column le"
        ) in err
    else:
        assert "column le of table public.users is a virtual generated column" in err
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
    env.sql("UPDATE users SET name = 'x'; DELETE FROM users WHERE id = 2")  # writes untouched


def test_a_virtual_column_beside_the_key_columns_leaves_writes_and_keys_alone(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys from stored columns, and a virtual column in the table: trigger mode copies
    only the key columns, and judges a column filter without the virtual column (its
    change is that of `email`); logical mode needs no REPLICA IDENTITY FULL here (the
    primary key covers the key columns), so the table is published."""
    if not has_virtual_columns(env):
        return
    users(env, VIRTUAL_LE)
    lines = "" if env.logical else 'ignore_columns = ["name"]'
    path = config(env, {"public.users": ["user:{id}"]}, lines)
    code, err = install(path, capsys)
    assert code == 0, err
    r = env.redis()
    r.mset({"user:1": "1", "user:2": "2"})
    with listening(path):
        env.sql("UPDATE users SET email = 'C@X' WHERE id = 1")
        env.sql("DELETE FROM users WHERE id = 2")
        settle(env, r)
    assert {k for k in keys(r) if not k.startswith("sync:")} == set()


def test_the_ddl_guard_refuses_a_virtual_column_on_a_table_with_full_identity(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logical mode: user:email:{email} gives users REPLICA IDENTITY FULL; a virtual
    column added then would make every UPDATE and DELETE of it fail. (Trigger mode has
    no guard and needs none: its triggers copy the key columns only.)"""
    if not has_virtual_columns(env):
        return
    users(env, "name2 text")
    code, err = install(config(env, {"public.users": ["user:{id}", "user:email:{email}"]}), capsys)
    assert code == 0, err
    if not env.logical:
        env.sql(f"ALTER TABLE users ADD COLUMN {VIRTUAL_LE}")
    else:
        assert env.scalar("SELECT relreplident FROM pg_class WHERE oid = 'users'::regclass") == "f"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="virtual"):
            env.sql(f"ALTER TABLE users ADD COLUMN {VIRTUAL_LE}")
    env.sql("UPDATE users SET name = 'x'; DELETE FROM users WHERE id = 2")


@pytest.mark.parametrize("capture", ["logical"])
def test_a_publication_from_before_18_refuses_ddl_only_where_generated_columns_are(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A publication made on 15 and carried to 18 (pg_upgrade, a dump) publishes no
    generated column. The DDL guard refused every ALTER TABLE of a watched table for
    that, tables without a generated column too, until `install` ran again (a review,
    15 to 18 by pg_upgrade). It refuses only where a stored generated column is left
    unpublished."""
    users(env, "name2 text")
    env.sql(
        "CREATE TABLE orders"
        " (id int PRIMARY KEY, total int, t2 int GENERATED ALWAYS AS (total * 2) STORED)"
    )
    tables = {"public.users": ["user:{id}"], "public.orders": ["order:{id}"]}
    code, err = install(config(env, tables), capsys)
    assert code == 0, err
    if int(env.scalar("SHOW server_version_num")) < 180000:
        with pytest.raises(psycopg.errors.SyntaxError):  # no such option before 18
            env.sql("ALTER PUBLICATION cdc_invalidator SET (publish_generated_columns = none)")
        return
    # As made on 15 (the guard would refuse the change itself: orders has one).
    env.sql(
        "ALTER EVENT TRIGGER cdc_invalidator_guard DISABLE;"
        "ALTER EVENT TRIGGER cdc_invalidator_guard_drops DISABLE;"
        "ALTER PUBLICATION cdc_invalidator SET (publish_generated_columns = none);"
        "ALTER EVENT TRIGGER cdc_invalidator_guard ENABLE ALWAYS;"
        "ALTER EVENT TRIGGER cdc_invalidator_guard_drops ENABLE ALWAYS"
    )
    env.sql("ALTER TABLE users ADD COLUMN age int")  # no generated column: let through
    with pytest.raises(
        psycopg.errors.ObjectInUse, match=r"generated columns of table public\.orders"
    ):
        env.sql("ALTER TABLE orders ADD COLUMN note text")


@pytest.mark.parametrize("capture", ["trigger"])
@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE users DROP COLUMN le; ALTER TABLE users ADD COLUMN {virtual}",
        "ALTER TABLE users ADD COLUMN v text GENERATED ALWAYS AS (lower(email)) VIRTUAL;"
        " ALTER TABLE users RENAME COLUMN le TO le_old; ALTER TABLE users RENAME COLUMN v TO le",
    ],
    ids=["drop-add", "rename"],
)
def test_a_key_column_made_virtual_after_install_is_refused(
    env: Env, capsys: pytest.CaptureFixture[str], ddl: str
) -> None:
    """Trigger mode: install refuses a virtual key column, but one could take a key
    column's name after install. The capture function reads it by name from the
    transition tables, and every UPDATE and DELETE of the table failed (a review, 18.6:
    "unexpected virtual generated column reference"). The rebuild guard refuses the DDL;
    writes go on, and keys are deleted as before."""
    if not has_virtual_columns(env):
        return
    users(env, "le text")
    env.sql("UPDATE users SET le = lower(email)")
    code, err = install(config(env, KEYS), capsys)
    assert code == 0, err
    with pytest.raises(
        psycopg.errors.FeatureNotSupported, match=r"column le of table public\.users"
    ):
        env.sql(f"BEGIN; {ddl.format(virtual=VIRTUAL_LE)}; COMMIT")
    path = config(env, KEYS)
    r = env.redis()
    r.mset({"user:1": "1", "user:email:a@x": "1", "user:2": "2", "user:email:b@x": "2"})
    with listening(path):
        env.sql("UPDATE users SET email = 'C@X' WHERE id = 1")
        env.sql("DELETE FROM users WHERE id = 2")
        settle(env, r)
    assert {k for k in keys(r) if not k.startswith("sync:")} == set()
