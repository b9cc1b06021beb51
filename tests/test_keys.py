"""`cdc-invalidator keys`: the keys a row maps to, offline from COLUMN=VALUE (no server
is reached: the configuration points at closed ports) and live with --where (real
PostgreSQL, as the configured role)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_invalidator.cli import main
from cdc_invalidator.tools import keys as keys_tool
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.roles import login_role
from tests.support.servers import free_port

TEMPLATES = ["user:{id}", "user:email:{email|lower}", "user:h:{email|trim|md5}"]
PASSWORD = "S3cr3t-keys-77a1"  # noqa: S105 - a test role's, to show it is never printed


def offline_config(tmp_path: Path) -> Path:
    closed = free_port()
    return write_config(
        tmp_path / "c.toml",
        database_url=f"postgresql://app:{PASSWORD}@127.0.0.1:{closed}/app",
        redis_url=f"redis://127.0.0.1:{closed}",
        tables={"public.users": TEMPLATES, "shop.orders": ["order:{id}:{user_id}"]},
    )


def keys(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["keys", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    return code, out, err


def test_offline_keys_render_filters_as_the_listener_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = offline_config(tmp_path)
    code, out, err = keys(capsys, config, "users", "id=7", "email= Ann@X.org ")
    assert code == 0, err
    # md5 of the trimmed email (the value as the app normalised it)
    assert out.splitlines() == [
        "user:7",
        "user:email: ann@x.org ",
        "user:h:" + __import__("hashlib").md5(b"Ann@X.org").hexdigest(),
    ]
    assert err == ""
    code, out, _ = keys(capsys, config, "shop.orders", "id=1", "user_id=a=b")
    assert (code, out) == (0, "order:1:a=b\n"), "the value is all after the first '='"


def test_offline_keys_name_the_missing_columns_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = offline_config(tmp_path)
    code, out, err = keys(capsys, config, "public.users", "id=7", "emial=a@x")
    assert code == 2
    assert out == "user:7\n", "what renders is printed all the same"
    assert "no template of public.users uses column 'emial' (they use email, id)" in err
    assert "template 'user:email:{email|lower}' needs email: give email=VALUE" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["orders", "id=1"], "table 'orders' is not in the configuration (configured: "),
        (["users", "id"], "'id' is not COLUMN=VALUE"),
        (["users", "id=1", "id=2"], "column 'id' is given twice"),
        (["users"], "give the row's values as COLUMN=VALUE, or --where SQL"),
        (["users", "id=1", "--where", "true"], "give COLUMN=VALUE or --where, not both"),
        (["users", "--where", "true", "--limit", "0"], "--limit 0: must be at least 1"),
        (["users.x.y", "id=1"], "invalid table name"),
    ],
)
def test_bad_usage_is_one_line_naming_the_culprit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = keys(capsys, offline_config(tmp_path), *args)
    assert code == 2
    assert out == ""
    assert message in err
    assert len(err.splitlines()) == 1, err


# --- live: --where ------------------------------------------------------------------------


@pytest.fixture
def users(env: Env) -> Path:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "INSERT INTO users SELECT i, 'U' || i || '@X' FROM generate_series(1, 5) i;"
        "INSERT INTO users VALUES (6, NULL);"
        "CREATE SEQUENCE s"
    )
    return env.config({"public.users": TEMPLATES})


@pytest.fixture
def reader(env: Env) -> Iterator[str]:
    """A login role with a password and no privilege on users."""
    with login_role(env, "reader_", sql.SQL("PASSWORD {}").format(sql.Literal(PASSWORD))) as role:
        yield role


@pytest.mark.usefixtures("capture")
def test_where_reads_live_rows_and_notes_the_limit(
    env: Env, users: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = keys(capsys, users, "users", "--where", "id IN (2, 6)")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["user:2", "user:email:u2@x"]
    assert lines[3] == "user:6", "a NULL email skips that row's email keys only"
    assert len(lines) == 4
    code, out, err = keys(capsys, users, "users", "--where", "id <= 5", "--limit", "2")
    assert code == 0
    assert len(out.splitlines()) == 2 * 3
    assert "only the first 2 were read (--limit)" in err
    code, out, err = keys(capsys, users, "users", "--where", "id > 100")
    assert (code, out) == (0, "")
    assert "no row of public.users matches --where 'id > 100'" in err


def test_where_renders_as_the_listener_whatever_the_operators_settings(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's session may print times in its own zone and style: the keys shown
    are the listener's (UTC, ISO), or they would not be the keys to look for."""
    env.sql(
        "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz, tag bytea);"
        "INSERT INTO ev VALUES (1, '2024-05-01 12:00+00', '\\x00ff')"
    )
    config = env.config({"public.ev": ["ev:{at}:{tag}"]})
    monkeypatch.setenv("PGTZ", "America/New_York")
    monkeypatch.setenv("PGDATESTYLE", "SQL, DMY")
    monkeypatch.setenv("PGOPTIONS", "-c bytea_output=escape")
    code, out, err = keys(capsys, config, "ev", "--where", "id = 1")
    assert code == 0, err
    assert out.splitlines() == ["ev:2024-05-01 12:00:00+00:\\x00ff"]


@pytest.mark.usefixtures("capture")
def test_where_cannot_write_nor_add_a_statement(
    env: Env, users: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_tool, "STATEMENT_TIMEOUT", "1s")  # the last query: its timeout
    code, _, err = keys(capsys, users, "users", "--where", "true; DROP TABLE users")
    assert code == 2
    assert "--where 'true; DROP TABLE users': PostgreSQL: " in err
    code, _, err = keys(capsys, users, "users", "--where", "nextval('public.s') > 0")
    assert code == 2
    assert "read-only transaction" in err
    assert "Traceback" not in err
    assert env.scalar("SELECT count(*) FROM users") == 6
    assert env.scalar("SELECT last_value FROM s") == 1
    assert env.scalar("SELECT is_called FROM s") is False
    code, _, err = keys(capsys, users, "users", "--where", "id = ")
    assert code == 2
    assert "PostgreSQL: syntax error at or near" in err
    code, _, err = keys(capsys, users, "users", "--where", "pg_sleep(30) IS NULL")
    assert code == 1
    assert "ran longer than 1s (statement_timeout)" in err


def test_where_reads_the_condition_with_the_roles_search_path(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The condition is the operator's SQL: an operator an extension put in public
    (citext's case-blind `=`) is the one psql would use. Under our sessions' pinned
    search_path it was read as text's `=`, and matched nothing, silently."""
    env.sql(
        "CREATE EXTENSION IF NOT EXISTS citext;"
        "CREATE TABLE users (id int PRIMARY KEY, email citext);"
        "INSERT INTO users VALUES (1, 'Ann@X.org')"
    )
    config = env.config({"public.users": ["user:{id}"]})
    code, out, err = keys(capsys, config, "users", "--where", "email = 'ann@x.org'")
    assert (code, out) == (0, "user:1\n"), err


def test_where_refuses_a_column_whose_type_another_function_casts_to_text(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table's owner may make a type and cast it to text by a function of its own:
    --where read the column as text, and ran that function as the operator's role (the
    second review ran a shell command as the server's user through a superuser's
    --where). It is refused, naming the column and the function."""
    env.sql(
        "CREATE TYPE mood AS ENUM ('ok', 'sad');"
        "CREATE TABLE ran (who text);"
        "CREATE FUNCTION public.mood_text(m mood) RETURNS text LANGUAGE plpgsql AS"
        " $$BEGIN INSERT INTO ran VALUES (current_user); RETURN m::text || '!'; END$$;"
        "CREATE CAST (mood AS text) WITH FUNCTION public.mood_text(mood);"
        "CREATE TABLE acct (id int PRIMARY KEY, m mood);"
        "INSERT INTO acct VALUES (1, 'ok')"
    )
    config = env.config({"public.acct": ["acct:{id}:{m}"]})
    code, out, err = keys(capsys, config, "acct", "--where", "id = 1")
    assert (code, out) == (2, "")
    assert "column 'm' of public.acct is of type public.mood, which public.mood_text(" in err, err
    assert env.scalar("SELECT count(*) FROM ran") == 0


def test_where_refuses_such_a_cast_through_a_domain_over_a_domain(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same cast reached through a domain over a domain over the type (PostgreSQL
    casts a domain by its base type, through every level): the look-up saw only the
    first domain's base, another domain with no cast, and --where ran the function as
    the operator's role (a row in `ran`). Refused too."""
    env.sql(
        "CREATE TYPE mood AS ENUM ('ok', 'sad');"
        "CREATE DOMAIN dmood AS mood; CREATE DOMAIN ddmood AS dmood;"
        "CREATE TABLE ran (who text);"
        "CREATE FUNCTION public.mood_text(m mood) RETURNS text LANGUAGE plpgsql AS"
        " $$BEGIN INSERT INTO public.ran VALUES (current_user);"
        " RETURN pg_catalog.enum_out(m)::text || '!'; END$$;"
        "CREATE CAST (mood AS text) WITH FUNCTION public.mood_text(mood);"
        "CREATE TABLE acct (id int PRIMARY KEY, m ddmood);"
        "INSERT INTO acct VALUES (1, 'ok')"
    )
    config = env.config({"public.acct": ["acct:{id}:{m}"]})
    code, out, err = keys(capsys, config, "acct", "--where", "id = 1")
    assert (code, out) == (2, ""), (out, err)
    assert "column 'm' of public.acct is of type public.ddmood, which public.mood_text(" in err
    assert env.scalar("SELECT count(*) FROM ran") == 0


@pytest.mark.usefixtures("capture")
def test_where_refused_says_which_privilege_without_the_password(
    env: Env, users: Path, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        env.tmp_path / "reader.toml",
        database_url=make_conninfo(env.dsn, user=reader, password=PASSWORD),
        redis_url=env.redis_url,
        tables={"public.users": TEMPLATES},
    )
    code, out, err = keys(capsys, config, "users", "--where", "true")
    assert code == 1
    assert out == ""
    assert "permission denied for table users" in err
    assert "needs SELECT on it (or give COLUMN=VALUE: offline)" in err
    # Offline, the same role's configuration needs no privilege at all.
    code, out, err = keys(capsys, config, "users", "id=1", "email=a")
    assert (code, err) == (0, "")
