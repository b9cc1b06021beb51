"""Trigger mode with `notify_payload = true`: what a one-row write needs beyond the
queue, and `check` saying so.

The capture function (its table's owner's) calls cdc_invalidator.notify_row_v1(),
which runs pg_notify() as its own owner, the installing role. Either privilege gone
since install fails every one-row write while the listener is quiet (and the write is
not queued), where `check` reported all was well: the table owner's EXECUTE on
notify_row_v1() (revoked by hand), or the installer's on pg_notify() (a hardened server
that gave it to the tables' owners alone, as watch()'s hint says, and an installer that
had it only through its membership in the owner, revoked after install).
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.faults import setup_users, users_config
from tests.support.listener import check
from tests.support.roles import login_role


def one_row_write_fails(env: Env, owner: str) -> str:
    """The error of a one-row UPDATE by the table's owner, no listener running (quiet: a
    payload is sent)."""
    with (
        psycopg.connect(make_conninfo(env.dsn, user=owner), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege) as failed,
    ):
        conn.execute("UPDATE users SET email = 'n@x' WHERE id = 2")
    return str(failed.value)


def test_check_names_an_owner_that_may_not_run_notify_row(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    with login_role(env, "owner_") as owner:
        config = setup_users(env, rows=3, notify_payload=True)
        env.sql(sql.SQL("ALTER TABLE users OWNER TO {}").format(sql.Identifier(owner)).as_string())
        assert main(["install", "--config", str(config)]) == 0
        env.sql(
            "REVOKE EXECUTE ON FUNCTION cdc_invalidator.notify_row_v1(text) FROM "
            + sql.Identifier(owner).as_string()
        )
        assert "notify_row_v1" in one_row_write_fails(env, owner)
        code, out, err = check(config, capsys)
        assert code != 0, out + err
        assert f"role {owner}, which may not run cdc_invalidator.notify_row_v1(text)" in out + err
        assert main(["install", "--config", str(config)]) == 0  # grants it again
        code, out, err = check(config, capsys)
        assert "notify_row_v1" not in err, err


def test_check_names_an_installer_that_may_not_run_pg_notify(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    database = sql.Identifier(str(env.scalar("SELECT current_database()")))
    with login_role(env, "owner_") as owner, login_role(env, "installer_") as installer:
        o, i = sql.Identifier(owner), sql.Identifier(installer)
        for statement in (
            sql.SQL("GRANT {} TO {}").format(o, i),
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(database, i),
            sql.SQL("CREATE TABLE users (id int PRIMARY KEY, email text)"),
            sql.SQL("INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(1, 3) g"),
            sql.SQL("ALTER TABLE users OWNER TO {}").format(o),
            # A hardened server: pg_notify() the tables' owners' only (watch()'s hint).
            sql.SQL("REVOKE EXECUTE ON FUNCTION pg_notify(text, text) FROM PUBLIC"),
            sql.SQL("GRANT EXECUTE ON FUNCTION pg_notify(text, text) TO {}").format(o),
        ):
            env.sql(statement.as_string())
        try:
            config = users_config(env, role=installer, notify_payload=True)
            assert main(["install", "--config", str(config)]) == 0
            code, out, err = check(config, capsys)
            assert "pg_notify" not in out + err, out + err
            # The membership only install needed, taken back.
            env.sql(sql.SQL("REVOKE {} FROM {}").format(o, i).as_string())
            assert "pg_notify" in one_row_write_fails(env, owner)
            code, out, err = check(config, capsys)
            assert code != 0, out + err
            assert (
                f"belongs to role {installer}, which may not run pg_catalog.pg_notify(text, text)"
                in out + err
            ), out + err
        finally:
            env.sql("GRANT EXECUTE ON FUNCTION pg_notify(text, text) TO PUBLIC")
            env.sql("DROP TABLE IF EXISTS users CASCADE")
            env.sql("DROP SCHEMA IF EXISTS cdc_invalidator CASCADE")


def test_no_role_but_the_installer_keeps_a_grant_on_the_payloads_channel(env: Env) -> None:
    """The installing role's default privileges grant SELECT on the tables it makes (or a
    hand granted it since): each install takes any grant on payload_channel_v1 back."""
    with login_role(env, "reader_") as reader:
        ident = sql.Identifier(reader)
        env.sql(
            sql.SQL("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {}")
            .format(ident)
            .as_string()
        )
        try:
            config = setup_users(env, rows=1, notify_payload=True)
            readable = (
                "SELECT has_table_privilege(%s, 'cdc_invalidator.payload_channel_v1', 'SELECT')"
            )
            assert not env.scalar(readable, [reader])
            env.sql(
                sql.SQL("GRANT SELECT ON cdc_invalidator.payload_channel_v1 TO {}")
                .format(ident)
                .as_string()
            )
            assert main(["install", "--config", str(config)]) == 0
            assert not env.scalar(readable, [reader])
        finally:
            env.sql(
                sql.SQL("ALTER DEFAULT PRIVILEGES REVOKE SELECT ON TABLES FROM {}")
                .format(ident)
                .as_string()
            )


def test_check_warns_of_a_capture_function_that_sends_its_payload_on_the_wake_up_channel(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier release's install sent the payload on cdc_invalidator_v1, where any role
    may LISTEN: check says so until install runs (its text stands in for that function's
    here: check reads the function's source)."""
    config = setup_users(env, rows=1, notify_payload=True)
    function = "format('cdc_invalidator.%I()', 'capture_' || 'users'::regclass::oid || '_v1')"
    definition = env.scalar(f"SELECT pg_get_functiondef(({function})::regprocedure)")
    assert isinstance(definition, str)
    marker = "-- pg_notify('cdc_invalidator_v1', CASE WHEN octet_length\n"
    env.sql(definition.replace("BEGIN\n", "BEGIN\n" + marker, 1))
    _, out, _ = check(config, capsys)
    assert "sends its NOTIFY payload on channel cdc_invalidator_v1" in out
    assert main(["install", "--config", str(config)]) == 0
    _, out, _ = check(config, capsys)
    assert "sends its NOTIFY payload on channel" not in out
