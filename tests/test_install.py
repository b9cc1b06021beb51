"""The SQL lifecycle through the CLI: sql, install, re-install, uninstall, check, and the
watch()/unwatch() API with its privileges, on a real PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_invalidator.capture import trigger_sql
from tests.support.env import FAST_PG, Env
from tests.support.listener import (
    ListenerProcess,
    ListenerThread,
    Spawn,
    check,
    cli,
    listening,
    run_cli,
    stop_listener,
)
from tests.support.psql import psql
from tests.support.roles import login_role
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}
ORDERS = {"public.orders": ["order:{id}", "user:{user_id}:orders"]}
OUR_TRIGGERS = "starts_with(tgname, 'cdc_invalidator_')"

# Everything install creates, as text that two installs can be compared by.
CATALOG = {
    "schema": "SELECT nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace "
    "WHERE nspname = 'cdc_invalidator'",
    "relations": """
        SELECT c.relname, c.relkind, c.reloptions::text, obj_description(c.oid, 'pg_class'),
               (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                  || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END,
                                  ', ' ORDER BY a.attnum)
                FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                  AND NOT a.attisdropped)
        FROM pg_class c WHERE c.relnamespace = to_regnamespace('cdc_invalidator')
        ORDER BY 1""",
    "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
    "FROM pg_constraint WHERE connamespace = to_regnamespace('cdc_invalidator') ORDER BY 1, 2",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prosecdef,
               p.proconfig::text, pg_get_functiondef(p.oid), p.proacl::text,
               pg_get_userbyid(p.proowner)
        FROM pg_proc p WHERE p.pronamespace = to_regnamespace('cdc_invalidator')
        ORDER BY 1, 2""",
    "triggers": f"""
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE {OUR_TRIGGERS} ORDER BY 1, 2""",
}


def catalog(env: Env) -> dict[str, list[tuple[Any, ...]]]:
    with env.connect() as conn:
        snap = {name: conn.execute(query.encode()).fetchall() for name, query in CATALOG.items()}
        if conn.execute("SELECT to_regclass('cdc_invalidator.watched_v1')").fetchone() != (None,):
            snap["watched"] = conn.execute(
                "SELECT relid::text, columns FROM cdc_invalidator.watched_v1 ORDER BY 1"
            ).fetchall()
        return snap


def tables(env: Env) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int);"
        "INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B');"
        "INSERT INTO orders VALUES (1, 1)"
    )


def triggers_on(env: Env, table: str) -> list[str]:
    with env.connect() as conn:
        return [
            name
            for (name,) in conn.execute(
                f"SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND {OUR_TRIGGERS} "
                "ORDER BY 1".encode(),
                [table],
            )
        ]


def capture_function_exists(env: Env, table: str) -> bool:
    return bool(
        env.scalar(
            "SELECT EXISTS (SELECT FROM pg_proc WHERE proname = "
            "'capture_' || %s::regclass::oid || '_v1')",
            [table],
        )
    )


def queued(env: Env) -> list[tuple[str, str, Any, Any]]:
    with env.connect() as conn:
        return conn.execute(
            "SELECT table_name, op, old_row, new_row FROM cdc_invalidator.queue_v1 ORDER BY id"
        ).fetchall()


def clear_queue(env: Env) -> None:
    env.sql("DELETE FROM cdc_invalidator.queue_v1")


def sql_output(config: Path) -> str:
    result = run_cli("sql", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- sql -----------------------------------------------------------------------------------


def test_sql_piped_into_psql_installs_what_install_installs(env: Env) -> None:
    tables(env)
    config = env.config({**USERS, **ORDERS})
    script = sql_output(config)
    assert script.lstrip().startswith("--"), "the DBA's script opens with what it does"
    assert "CREATE SCHEMA" in script
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None, "sql changes nothing"

    result = psql(env, script)
    assert result.returncode == 0, result.stderr
    by_psql = catalog(env)
    assert by_psql["watched"] == [("orders", ["id", "user_id"]), ("users", ["email", "id"])]
    assert len(by_psql["triggers"]) == 8
    env.sql("UPDATE users SET email = 'c@x' WHERE id = 1")
    assert queued(env) == [("users", "U", {"id": "1", "email": "a@x"}, {"id": "1", "email": "c@x"})]

    assert cli("uninstall", "--config", config) == 0
    assert catalog(env)["functions"] == []
    assert cli("install", "--config", config) == 0
    assert catalog(env) == by_psql


def test_sql_for_awkward_names_pipes_into_psql(env: Env) -> None:
    # Quotes, a backslash, mixed case and SQL in names: the script quotes them all.
    env.sql(
        'CREATE SCHEMA "Odd\\Schema";'
        'CREATE TABLE "Odd\\Schema"."it\'s ""quoted""; DROP TABLE victim" (id int);'
        "CREATE TABLE victim (id int)"
    )
    table = '"Odd\\Schema"."it\'s ""quoted""; DROP TABLE victim"'
    config = env.config({table: ["odd:{id}"]})
    result = psql(env, sql_output(config))
    assert result.returncode == 0, result.stderr
    assert env.scalar("SELECT to_regclass('victim')") is not None
    env.sql(f"INSERT INTO {table} VALUES (7)")
    assert queued(env) == [('it\'s "quoted"; DROP TABLE victim', "I", None, {"id": "7"})]
    assert cli("check", "--config", config) == 0


def test_sql_script_fails_as_a_whole_in_psql(env: Env) -> None:
    tables(env)
    config = env.config({**USERS, "public.missing": ["m:{id}"]})
    result = psql(env, sql_output(config))
    assert result.returncode != 0
    assert "missing" in result.stderr
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
    assert triggers_on(env, "users") == []


# --- install -------------------------------------------------------------------------------


def test_install_twice_is_harmless(env: Env) -> None:
    tables(env)
    config = env.config({**USERS, **ORDERS})
    assert cli("install", "--config", config) == 0
    env.sql("UPDATE users SET name = 'queued before the second install' WHERE id = 2")
    first = catalog(env)
    assert cli("install", "--config", config) == 0
    assert catalog(env) == first
    # The queued event survived; every change is captured once, not once per install.
    assert queued(env) == [("users", "U", {"id": "2", "email": "b@x"}, {"id": "2", "email": "b@x"})]
    clear_queue(env)
    env.sql("UPDATE users SET name = 'Z'")
    env.sql("INSERT INTO orders VALUES (2, 2)")
    env.sql("TRUNCATE orders")
    # The two-row UPDATE is one pack of two changes.
    assert sorted((t, op) for t, op, _, _ in queued(env)) == [
        ("orders", "I"),
        ("orders", "T"),
        ("users", "U"),
    ]
    assert env.scalar("SELECT rows FROM cdc_invalidator.queue_v1 WHERE op = 'U'") == 2
    assert triggers_on(env, "users") == [
        "cdc_invalidator_del_v1",
        "cdc_invalidator_ins_v1",
        "cdc_invalidator_trunc_v1",
        "cdc_invalidator_upd_v1",
    ]


def test_install_again_waits_for_no_writer_and_blocks_none(env: Env) -> None:
    """Install runs in one transaction: a lock it took on the queue, which every write to
    a watched table inserts into, would hold those writes until it commits, and it
    would itself wait behind any writer's open transaction (or pg_dump's read)."""
    tables(env)
    config = env.config({**USERS, **ORDERS})
    assert cli("install", "--config", config) == 0
    with env.connect() as writer, env.connect() as dump:
        writer.execute("BEGIN")
        writer.execute("UPDATE users SET name = 'a writer, not committed yet' WHERE id = 2")
        dump.execute("BEGIN")  # as pg_dump: ACCESS SHARE on every table it dumps
        for (table,) in dump.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname = 'cdc_invalidator'"
        ).fetchall():
            dump.execute(f"LOCK TABLE {table} IN ACCESS SHARE MODE".encode())
        done = run_cli("install", "--config", str(config), env={"PGOPTIONS": "-c lock_timeout=5s"})
        assert done.returncode == 0, done.stderr
        writer.execute("COMMIT")
        dump.execute("COMMIT")
    assert [op for _, op, _, _ in queued(env)] == ["U"]


def test_install_compresses_packs_with_lz4_where_the_server_has_it(env: Env) -> None:
    """A pack's JSON is compressed by the writer's session: lz4 costs a bulk statement's
    writer less than pglz. Set on an install made before (and only once: no lock each
    time); a server without lz4 keeps its default."""
    has_lz4 = env.scalar(
        "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    )
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    compression = (
        "SELECT array_agg(attcompression::text ORDER BY attname) FROM pg_attribute"
        " WHERE attrelid = 'cdc_invalidator.queue_v1'::regclass"
        " AND attname IN ('old_row', 'new_row')"
    )
    assert env.scalar(compression) == (["l", "l"] if has_lz4 else ["", ""])
    if has_lz4:
        env.sql(
            "ALTER TABLE cdc_invalidator.queue_v1 ALTER COLUMN old_row SET COMPRESSION pglz,"
            " ALTER COLUMN new_row SET COMPRESSION default"
        )
        assert cli("install", "--config", config) == 0
        assert env.scalar(compression) == ["l", "l"]
        env.sql("INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(10, 2009) g")
        assert (
            env.scalar(
                "SELECT pg_column_compression(new_row) FROM cdc_invalidator.queue_v1"
                " WHERE rows = 2000"  # one pack: a statement of 2,000 rows
            )
            == "lz4"
        )


# What the release before packs (schema revision 1, and no notify_payload) left installed,
# as the current install's objects less what later releases added. `CAPTURE_FUNCTIONS`
# names each capture function; `OLDER_CAPTURE` is a capture function's definition as that
# release compiled it: one queue row per change whatever the statement's size (the
# branch to packs never taken, its UPDATE's rows paired by number as they then were:
# `older_update`).
OLDER_RELEASE = """
    DROP FUNCTION cdc_invalidator.schema_revision();
    DROP TABLE cdc_invalidator.progress_v1;
    ALTER TABLE cdc_invalidator.queue_v1 DROP COLUMN rows;
    ALTER TABLE cdc_invalidator.dead_letter_v1 DROP COLUMN rows;
    DROP FUNCTION cdc_invalidator.queue_early_v1, cdc_invalidator.queue_packed_v1,
        cdc_invalidator.queue_judged_packed_v1, cdc_invalidator.pack_rows_v1,
        cdc_invalidator.queue_one_pack_v1, cdc_invalidator.one_pack_rows_v1;
    DROP FUNCTION cdc_invalidator.watch(regclass, text[], text, text[], boolean, integer);
    CREATE FUNCTION cdc_invalidator.watch(
        tbl regclass, key_columns text[], judge text DEFAULT NULL,
        filter_columns text[] DEFAULT NULL) RETURNS void LANGUAGE sql AS '';
"""
CAPTURE_FUNCTIONS = (
    "SELECT oid FROM pg_proc WHERE pronamespace = 'cdc_invalidator'::regnamespace"
    " AND proname ~ '^capture_[0-9]+_v1$'"
)
OLDER_CAPTURE = "SELECT replace(pg_get_functiondef(%s), 'IF many THEN', 'IF false THEN')"
# queue_statement_v1's UPDATE ONE (the new row by a subquery, for one row) -> its UPDATE.
ONE_ROW_UPDATE = re.compile(
    r"SELECT (.*?), CASE WHEN x\.n IS NULL THEN 'D' ELSE 'U' END, x\.o, x\.n"
    r" FROM \(SELECT (json_build_object\(.*?\)) AS o,"
    r" \(SELECT \2 FROM new_rows r\) AS n FROM old_rows r\) x"
)


def older_update(definition: str) -> str:
    """A capture function's UPDATE of one row as the release before packs ran every UPDATE."""
    return ONE_ROW_UPDATE.sub(
        r"SELECT \1, 'U', o.j, n.j"
        r" FROM (SELECT row_number() OVER () AS rn, \2 AS j FROM old_rows r) o"
        r" JOIN (SELECT row_number() OVER () AS rn, \2 AS j FROM new_rows r) n USING (rn)",
        definition,
    )


def install_older_release(env: Env, config: Path) -> None:
    """`config`'s tables installed as the release before packs left them (above)."""
    assert cli("install", "--config", config) == 0
    with env.connect() as conn, conn.transaction():
        conn.execute(OLDER_RELEASE.encode())
        functions = [oid for (oid,) in conn.execute(CAPTURE_FUNCTIONS)]
        assert functions
        for oid in functions:
            row = conn.execute(OLDER_CAPTURE, [oid]).fetchone()
            assert row is not None
            assert "IF false THEN" in row[0]
            definition = older_update(row[0])
            assert "USING (rn)" in definition
            conn.execute(definition.encode())


def test_install_over_an_earlier_releases_watch_leaves_one_watch(env: Env) -> None:
    """Releases before notify_payload had a four-argument watch(); CREATE OR REPLACE
    cannot add a parameter, so install drops it: otherwise two overloads would stay, and
    the script's own watch() calls (and a DBA's) would be ambiguous."""
    tables(env)
    config = env.config(USERS)
    install_older_release(env, config)
    assert cli("install", "--config", config) == 0
    assert env.scalar(
        "SELECT array_agg(oid::regprocedure::text) FROM pg_proc"
        " WHERE proname = 'watch' AND pronamespace = 'cdc_invalidator'::regnamespace"
    ) == ["cdc_invalidator.watch(regclass,text[],text,text[],boolean,integer)"]
    env.sql("SELECT cdc_invalidator.watch('public.users', ARRAY['id', 'email'])")


def test_install_over_a_five_argument_watch_leaves_one_watch_nobody_else_may_call(
    env: Env,
) -> None:
    """Releases before bulk_sweep_rows had a five-argument watch() (notify_payload its
    last): install drops it, and the one it creates is revoked from PUBLIC as it was."""
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    env.sql(
        "DROP FUNCTION cdc_invalidator.watch(regclass, text[], text, text[], boolean, integer);"
        " CREATE FUNCTION cdc_invalidator.watch(tbl regclass, key_columns text[],"
        " judge text DEFAULT NULL, filter_columns text[] DEFAULT NULL,"
        " notify_payload boolean DEFAULT false) RETURNS void LANGUAGE sql AS '';"
        " REVOKE ALL ON FUNCTION cdc_invalidator.watch(regclass, text[], text, text[], boolean)"
        " FROM PUBLIC"
    )
    assert cli("install", "--config", config) == 0
    assert env.scalar(
        "SELECT array_agg(oid::regprocedure::text) FROM pg_proc"
        " WHERE proname = 'watch' AND pronamespace = 'cdc_invalidator'::regnamespace"
    ) == ["cdc_invalidator.watch(regclass,text[],text,text[],boolean,integer)"]
    assert (
        env.scalar(
            "SELECT has_function_privilege('public',"
            " 'cdc_invalidator.watch(regclass,text[],text,text[],boolean,integer)', 'EXECUTE')"
        )
        is False
    )


def test_reinstall_after_config_change_brings_triggers_in_line(env: Env) -> None:
    tables(env)
    first = env.config({"public.users": ["user:{id}"], **ORDERS}, name="first.toml")
    assert cli("install", "--config", first) == 0
    assert capture_function_exists(env, "orders")
    # The team adds a template on a new column and stops caching orders.
    second = env.config(USERS, name="second.toml")
    assert cli("install", "--config", second) == 0

    assert triggers_on(env, "orders") == []
    assert not capture_function_exists(env, "orders")
    assert catalog(env)["watched"] == [("users", ["email", "id"])]
    env.sql("UPDATE users SET email = 'c@x' WHERE id = 1")
    env.sql("INSERT INTO orders VALUES (2, 1)")
    assert queued(env) == [("users", "U", {"id": "1", "email": "a@x"}, {"id": "1", "email": "c@x"})]

    # And by behaviour: the listener now deletes the old and new email keys.
    r = env.redis()
    r.mset({"user:1": "A", "user:email:c@x": "1", "user:email:d@x": "-", "order:2": "O"})
    listener = ListenerThread.from_file(second).start()
    try:
        wait_until(lambda: r.exists("user:email:c@x") == 0, what="queued event processed")
        env.sql("UPDATE users SET email = 'd@x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1", "user:email:c@x", "user:email:d@x") == 0)
        env.sql("INSERT INTO orders VALUES (3, 1)")
        wait_until(lambda: env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 0)
    finally:
        listener.stop()
    assert r.get("order:2") == "O"
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_install_fails_cleanly_when_a_table_is_missing(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    tables(env)
    broken = env.config({**USERS, "public.nosuch": ["n:{id}"]}, name="broken.toml")
    assert cli("install", "--config", broken) == 1
    err = capsys.readouterr().err
    assert "nosuch" in err
    assert "Traceback" not in err
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
    assert triggers_on(env, "users") == []

    # Over an existing install: the old state stays as it was.
    good = env.config({"public.users": ["user:{id}"]}, name="good.toml")
    assert cli("install", "--config", good) == 0
    before = catalog(env)
    assert cli("install", "--config", broken) == 1
    assert "nosuch" in capsys.readouterr().err
    assert catalog(env) == before


def test_reinstall_after_a_watched_table_was_recreated(env: Env) -> None:
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    env.sql(
        "DROP TABLE users; CREATE TABLE users (id int PRIMARY KEY, email text);"
        "INSERT INTO users VALUES (1, 'a@x')"
    )
    assert cli("install", "--config", config) == 0
    assert catalog(env)["watched"] == [("users", ["email", "id"])]
    assert len(triggers_on(env, "users")) == 4
    clear_queue(env)
    env.sql("UPDATE users SET email = 'b@x'")
    assert queued(env) == [("users", "U", {"id": "1", "email": "a@x"}, {"id": "1", "email": "b@x"})]


def test_install_leaves_no_capture_function_of_a_dropped_table(env: Env) -> None:
    tables(env)
    assert cli("install", "--config", env.config({**USERS, **ORDERS})) == 0
    env.sql("DROP TABLE orders")
    assert cli("install", "--config", env.config(USERS, name="users.toml")) == 0
    assert catalog(env)["watched"] == [("users", ["email", "id"])]
    functions = [row[0] for row in catalog(env)["functions"] if row[0].startswith("capture_")]
    users_oid = env.scalar("SELECT 'users'::regclass::oid")
    assert functions == [f"capture_{users_oid}_v1"]


@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_a_script_waiting_on_a_long_transactions_lock_gives_up_changing_nothing(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A transaction that wrote to a watched table holds a lock the script's CREATE or
    DROP TRIGGER waits for. The script gives up each wait after a moment (so do the
    writes queued behind it), tries again, and after TRY_FOR_S says so, changing nothing;
    the long transaction goes on. It waited without limit (no lock_timeout)."""
    tables(env)
    config = env.config({**USERS, **ORDERS})
    if command == "uninstall":
        assert cli("install", "--config", config) == 0
    before = catalog(env)
    monkeypatch.setattr(trigger_sql, "TRY_FOR_S", 1.0)
    with env.connect() as long_tx:
        long_tx.execute("BEGIN")
        long_tx.execute("UPDATE orders SET user_id = 2 WHERE id = 1")
        capsys.readouterr()
        assert cli(command, "--config", config) == 1
        err = capsys.readouterr().err
        assert f"{command} failed, nothing was changed: gave up after" in err, err
        assert "lock timeout" in err, err
        assert "Traceback" not in err
        assert catalog(env) == before
        long_tx.execute("COMMIT")  # it was not aborted
    assert env.scalar("SELECT user_id FROM orders WHERE id = 1") == 2
    assert cli(command, "--config", config) == 0, "once the transaction ended"


@pytest.mark.parametrize(("own", "kept"), [(None, "200ms"), ("2s", "2s"), ("0", "200ms")])
def test_the_scripts_lock_wait_is_bounded_unless_the_session_chose_its_own(
    env: Env, own: str | None, kept: str
) -> None:
    """Under half of deadlock_timeout by default; a lock_timeout the operator set
    (PGOPTIONS) is kept, for writers that hold a table longer, one after another."""
    with env.connect() as conn, conn.transaction():
        if own is not None:
            conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(own)))
        conn.execute(trigger_sql.guard(None))
        assert conn.execute("SHOW lock_timeout").fetchone() == (kept,)


# --- uninstall -----------------------------------------------------------------------------


def test_uninstall_removes_every_object_and_is_repeatable(env: Env) -> None:
    tables(env)
    env.sql("CREATE TABLE items (id int)")
    config = env.config({**USERS, **ORDERS})
    assert cli("uninstall", "--config", config) == 0  # nothing installed yet: harmless
    assert cli("install", "--config", config) == 0
    env.sql("SELECT cdc_invalidator.watch('items', ARRAY['id'])")  # watched by hand
    env.sql("UPDATE users SET name = 'queued'")
    # Uninstall with a config that no longer lists orders: it still goes.
    smaller = env.config(USERS, name="smaller.toml")
    assert cli("uninstall", "--config", smaller) == 0

    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
    assert env.scalar(f"SELECT count(*) FROM pg_trigger WHERE {OUR_TRIGGERS}") == 0
    assert env.scalar(r"SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture\_%\_v1'") == 0
    assert env.scalar(r"SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'cdc\_%'") == 0
    assert all(rows == [] for rows in catalog(env).values())
    # The application's tables and data are untouched and writable.
    env.sql("UPDATE users SET name = 'after'; INSERT INTO orders VALUES (5, 1); TRUNCATE items")
    assert env.scalar("SELECT count(*) FROM users WHERE name = 'after'") == 2

    assert cli("uninstall", "--config", config) == 0
    assert cli("install", "--config", config) == 0, "a clean re-install after uninstall"
    assert len(catalog(env)["triggers"]) == 8


# --- check ---------------------------------------------------------------------------------


def test_an_owner_changed_by_reassign_owned_is_named_by_check_and_mended_by_install(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """REASSIGN OWNED moves a table and its capture function to another role, not the
    grants install gave the old owner: every write to the table fails until install
    grants the new one."""
    env.sql("CREATE ROLE cdc_app_owner; CREATE ROLE cdc_new_owner")
    try:
        env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
        env.sql("ALTER TABLE users OWNER TO cdc_app_owner")
        config = env.config(USERS)
        assert cli("install", "--config", config) == 0
        env.sql("REASSIGN OWNED BY cdc_app_owner TO cdc_new_owner")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            env.sql("INSERT INTO users VALUES (1, 'a@x')")
        code, _, err = check(config, capsys)
        assert code == 1
        assert "belongs to role cdc_new_owner, which may not insert into the queue" in err
        assert "run `cdc-invalidator install`" in err
        assert cli("install", "--config", config) == 0
        env.sql("INSERT INTO users VALUES (1, 'a@x')")
        assert check(config, capsys)[0] == 0
    finally:
        env.sql("DROP TABLE IF EXISTS users")
        for role in ("cdc_app_owner", "cdc_new_owner"):
            env.sql(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_publication_for_all_tables_leaves_the_listeners_pruning_working(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A publication FOR ALL TABLES that publishes deletes (Debezium's default) takes our
    queue too, and a DELETE of a table without a replica identity then fails: the
    listener's pruning did, over and over. install gives the queue and progress_v1 one;
    check names such a publication made after install."""
    env.sql("CREATE PUBLICATION cdc_test_everything FOR ALL TABLES")
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    assert check(config, capsys)[0] == 0
    with listening(config) as listener:
        env.sql("UPDATE users SET name = 'pruned once done' WHERE id = 2")
        wait_until(lambda: queued(env) == [], what="the processed row pruned")
        assert listener.runner.postgres.failures == 0
    # As if the publication came after install.
    env.sql("ALTER TABLE cdc_invalidator.queue_v1 REPLICA IDENTITY DEFAULT")
    code, _, err = check(config, capsys)
    assert code == 1
    assert "publication cdc_test_everything is FOR ALL TABLES" in err
    assert cli("install", "--config", config) == 0
    assert check(config, capsys)[0] == 0


def test_check_passes_when_all_is_well(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    tables(env)
    config = env.config({**USERS, **ORDERS})
    assert cli("install", "--config", config) == 0
    code, out, err = check(config, capsys)
    assert code == 0, err
    assert err == ""
    assert "users" in out
    assert "orders" in out


def async_commit_warning(out: str) -> str | None:
    """check's warning naming where synchronous_commit is off, if it printed one."""
    found = [line for line in out.splitlines() if "synchronous_commit = off" in line]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_check_names_each_setting_that_makes_writers_commit_asynchronously(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash loses such commits after readers may have cached them, which no capture
    sees: check says where they are turned on for this database's writers, and that the
    listener sweeps every watched table after a crash (sweep_after_crash), or, told
    never to, that a DBA must. The test server's own configuration turns them on
    (FAST_PG, in its postgresql.auto.conf)."""
    assert FAST_PG["synchronous_commit"] == "off"
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    code, out, _ = check(config, capsys)
    assert code == 0, "a warning, not a failure"
    line = async_commit_warning(out)
    assert line is not None, out
    assert "(the server's configuration (configuration file))" in line, line
    assert "the listener sweeps every watched table after PostgreSQL comes up from a crash" in line
    never = env.config(USERS, name="never.toml", sweep_after_crash="never")
    code, out, _ = check(never, capsys)
    line = async_commit_warning(out) or ""
    assert "sweep_after_crash = never: nothing is swept after a crash" in line, out
    assert "docs/DBA.md" in line

    db = env.scalar("SELECT current_database()")
    # This database's sessions commit synchronously: the server's setting no longer
    # reaches its writers (nor can this session see it).
    env.sql(f'ALTER DATABASE "{db}" SET synchronous_commit = on')
    code, out, _ = check(config, capsys)
    assert async_commit_warning(out) is None, out
    with login_role(env, "async_writer_") as role, login_role(env, "other_db_") as other:
        env.sql(f"ALTER ROLE \"{role}\" SET synchronous_commit TO 'FALSE'")
        # Not off: flushed locally before the commit returns.
        env.sql(f'ALTER ROLE "{role}" IN DATABASE "{db}" SET synchronous_commit = local')
        # Another database's writers.
        env.sql(f'ALTER ROLE "{other}" IN DATABASE postgres SET synchronous_commit = off')
        try:
            code, out, _ = check(config, capsys)
            assert f"(ALTER ROLE {role})" in (async_commit_warning(out) or ""), out
            env.sql(f'ALTER DATABASE "{db}" SET synchronous_commit = off')
            code, out, _ = check(config, capsys)
            line = async_commit_warning(out)
            assert f"(ALTER DATABASE {db}; ALTER ROLE {role})" in (line or ""), out
        finally:
            env.sql(f'ALTER ROLE "{other}" IN DATABASE postgres RESET synchronous_commit')


def test_check_warns_when_one_tables_sweep_reaches_anothers_keys(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    tables(env)
    env.sql("CREATE TABLE user_settings (id int PRIMARY KEY, theme text)")
    config = env.config(
        {
            "public.users": ["user:{id}", "user:email:{email}"],
            "public.user_settings": ["user:settings:{id}"],
            "public.orders": ["order:{id}"],
        }
    )
    assert cli("install", "--config", config) == 0
    code, out, err = check(config, capsys)
    assert code == 0, err  # a warning, not an error: nothing is lost, keys are over-deleted
    warnings = [line for line in out.splitlines() if "TRUNCATE" in line]
    # users' user:* matches user_settings' user:settings:1; user_settings' user:settings:*
    # matches none of users' keys (user:1, user:email:1), orders' order:* nothing at all.
    assert len(warnings) == 1, out
    [line] = warnings
    assert line.startswith(f"warning: {config}: a TRUNCATE of table 'public.users' sweeps ")
    assert "'user:*' (template 'user:{id}')" in line
    assert "table 'public.user_settings' (template 'user:settings:{id}', such as " in line
    assert "'user:settings:1'" in line


def test_check_warns_of_a_field_written_in_doubled_braces(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """`{{id}}` is the literal text `{id}` in every key: a Redis Cluster hash tag around
    the value is `{{{id}}}`. Easy to get wrong, and every key was the same fixed one."""
    tables(env)
    config = env.config({"public.users": ["user:{{id}}", "user:{{{id}}}:email"]})
    assert cli("install", "--config", config) == 0
    code, out, err = check(config, capsys)
    assert code == 0, err
    [line] = [line for line in out.splitlines() if "doubled braces" in line]
    assert "template 'user:{{id}}' of table 'public.users' has the literal text '{id}'" in line
    assert "write 'user:{{{id}}}'" in line


def test_check_warns_about_whichever_table_sweeps_the_other(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    tables(env)
    config = env.config({"public.users": ["u:{id}:x"], "public.orders": ["u:{id}"]})
    assert cli("install", "--config", config) == 0
    code, out, err = check(config, capsys)
    assert code == 0, err
    # orders' u:* matches users' u:1:x; users' u:*:x matches no key of orders (u:1).
    warnings = [line for line in out.splitlines() if "TRUNCATE" in line]
    assert len(warnings) == 1, out
    assert "a TRUNCATE of table 'public.orders' sweeps 'u:*'" in warnings[0]


def test_check_is_quiet_about_tables_in_different_redis_databases(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    tables(env)
    env.sql("CREATE TABLE user_settings (id int PRIMARY KEY, theme text)")
    config = env.config(
        {"public.users": ["user:{id}"], "public.user_settings": ["user:settings:{id}"]}
    )
    with config.open("a") as f:
        f.write("redis_db = 5\n")  # the last table written: user_settings
    assert cli("install", "--config", config) == 0
    code, out, err = check(config, capsys)
    assert code == 0, err
    assert "TRUNCATE" not in out, out


@pytest.mark.parametrize("command", ["check", "status"])
def test_check_and_status_before_install_say_not_installed(env: Env, command: str) -> None:
    tables(env)
    result = run_cli(command, "--config", str(env.config(USERS)))
    assert result.returncode == 1
    assert "not installed" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_before_install_says_not_installed(env: Env) -> None:
    tables(env)
    result = run_cli(
        "run", "--config", str(env.config(USERS)), env={"CDC_INVALIDATOR_LOG_FORMAT": "json"}
    )
    assert result.returncode == 1
    assert '"not_installed"' in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["status", "run"])
def test_an_emptied_state_table_is_named_with_what_to_run(env: Env, command: str) -> None:
    """Our own state row gone (deleted by hand): one clear line, never a traceback."""
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    env.sql("DELETE FROM cdc_invalidator.listener_state_v1")
    result = run_cli(command, "--config", str(config))
    assert result.returncode == 1
    said = result.stdout + result.stderr
    assert "listener_state_v1 is empty: run `cdc-invalidator install`" in said
    assert "Traceback" not in said


def test_check_names_file_and_missing_table(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    wrong = env.config({**USERS, "public.nosuch": ["n:{id}"]}, name="wrong.toml")
    code, _, err = check(wrong, capsys)
    assert code != 0
    line = next(line for line in err.splitlines() if "nosuch" in line)
    assert str(wrong) in line
    assert "does not exist" in line


def test_check_names_template_and_missing_column(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    wrong = env.config({"public.users": ["user:{id}", "user:nick:{nickname}"]}, name="wrong.toml")
    code, _, err = check(wrong, capsys)
    assert code != 0
    line = next(line for line in err.splitlines() if "nickname" in line)
    assert str(wrong) in line
    assert "user:nick:{nickname}" in line
    assert "users" in line


def test_check_says_triggers_are_out_of_date_after_config_change(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    tables(env)
    old = env.config({"public.users": ["user:{id}"]}, name="old.toml")
    assert cli("install", "--config", old) == 0
    new = env.config(USERS, name="new.toml")  # gained user:email:{email}, not re-installed
    code, _, err = check(new, capsys)
    assert code != 0
    line = next(line for line in err.splitlines() if "users" in line)
    assert "trigger" in line
    assert "email" in line
    assert "install" in line
    assert cli("install", "--config", new) == 0
    assert check(new, capsys)[0] == 0


@dataclass(frozen=True)
class Compiled:
    """A setting install compiles into the capture functions, and what check says of it."""

    settings: dict[str, object]  # the setting on
    named: str  # in the line of check's warning
    off: str  # not in check's output while it is off, installed and configured
    warned: tuple[str, ...]  # configured on, installed off
    on: str  # configured and installed on
    back: str  # configured off, installed on


COMPILED = [
    Compiled(
        {"notify_payload": True},
        "notify_payload",
        "NOTIFY payload",
        ("installed with notify_payload = false", "true in the configuration"),
        "sent in its NOTIFY payload",
        "installed with notify_payload = true, but it is false",
    ),
    Compiled(
        {"bulk_sweep_rows": 5000},
        "bulk_sweep_rows",
        "bulk_sweep_rows",
        ("installed with bulk_sweep_rows = 0, but it is 5000",),
        "a statement of 5000 rows or more of public.users sweeps",
        "installed with bulk_sweep_rows = 5000, but it is 0",
    ),
]


@pytest.mark.parametrize("compiled", COMPILED, ids=[c.named for c in COMPILED])
def test_check_says_how_a_compiled_setting_was_installed(
    env: Env, capsys: pytest.CaptureFixture[str], compiled: Compiled
) -> None:
    tables(env)
    off = env.config(USERS, name="off.toml")
    on = env.config(USERS, name="on.toml", **compiled.settings)
    assert cli("install", "--config", off) == 0
    code, out, err = check(off, capsys)
    assert (code, err) == (0, "")
    assert compiled.off not in out

    code, out, err = check(on, capsys)  # configured on, installed off
    assert (code, err) == (0, ""), "a warning: nothing is missed either way"
    line = next(line for line in out.splitlines() if compiled.named in line)
    assert line.startswith("warning: ")
    for needle in compiled.warned:
        assert needle in line
    assert "install" in line

    assert cli("install", "--config", on) == 0
    code, out, err = check(on, capsys)
    assert (code, err) == (0, "")
    assert compiled.on in out
    code, out, _ = check(off, capsys)
    assert code == 0
    assert compiled.back in out


def test_watch_refuses_a_bulk_sweep_rows_below_a_pack(env: Env) -> None:
    tables(env)
    assert cli("install", "--config", env.config(USERS)) == 0
    with env.connect() as conn, pytest.raises(psycopg.errors.InvalidParameterValue) as exc:
        conn.execute(
            "SELECT cdc_invalidator.watch('public.users', ARRAY['id'], bulk_sweep_rows => 999)"
        )
    assert "bulk_sweep_rows must be at least 1000, not 999" in str(exc.value)


def test_check_notices_triggers_dropped_by_hand(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    env.sql("DROP TRIGGER cdc_invalidator_trunc_v1 ON users")
    code, _, err = check(config, capsys)
    assert code != 0
    assert "users" in err
    assert "install" in err


# --- The SQL API and its privileges --------------------------------------------------------


def test_watch_and_unwatch_by_hand(env: Env) -> None:
    tables(env)
    env.sql("CREATE TABLE items (id int, sku text); CREATE VIEW items_v AS SELECT * FROM items")
    assert cli("install", "--config", env.config(USERS)) == 0
    env.sql("SELECT cdc_invalidator.watch('items', ARRAY['sku', 'id', 'sku'])")
    assert ("items", ["id", "sku"]) in catalog(env)["watched"]
    assert len(triggers_on(env, "items")) == 4
    env.sql("INSERT INTO items VALUES (1, 'k')")
    assert queued(env) == [("items", "I", None, {"id": "1", "sku": "k"})]

    with pytest.raises(psycopg.errors.UndefinedColumn, match="nope"):
        env.sql("SELECT cdc_invalidator.watch('items', ARRAY['id', 'nope'])")
    with pytest.raises(psycopg.errors.WrongObjectType):
        env.sql("SELECT cdc_invalidator.watch('items_v', ARRAY['id'])")

    env.sql("SELECT cdc_invalidator.unwatch('items')")
    assert triggers_on(env, "items") == []
    assert not capture_function_exists(env, "items")
    assert "items" not in [rel for rel, _ in catalog(env)["watched"]]
    clear_queue(env)
    env.sql("INSERT INTO items VALUES (2, 'l'); TRUNCATE items")
    assert queued(env) == []


@pytest.fixture
def plain_role(env: Env) -> Iterator[str]:
    """A login role with no privileges beyond what a test grants it."""
    with login_role(env, "plain_") as role:
        yield role


def test_watch_and_unwatch_are_not_executable_by_public(env: Env, plain_role: str) -> None:
    tables(env)
    assert cli("install", "--config", env.config(USERS)) == 0
    with env.connect() as conn:
        # Even with USAGE on the schema, EXECUTE is what is missing.
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA cdc_invalidator TO {}").format(
                sql.Identifier(plain_role)
            )
        )
        public_can_execute = conn.execute(
            """SELECT p.oid::regprocedure::text FROM pg_proc p
               WHERE p.pronamespace = 'cdc_invalidator'::regnamespace
                 AND p.prorettype IN ('void'::regtype, 'trigger'::regtype)
                 AND (p.proacl IS NULL
                      OR EXISTS (SELECT FROM aclexplode(p.proacl) a WHERE a.grantee = 0))"""
        ).fetchall()
    assert public_can_execute == []
    with psycopg.connect(make_conninfo(env.dsn, user=plain_role), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="function watch"):
            conn.execute("SELECT cdc_invalidator.watch('orders', ARRAY['id'])")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="function unwatch"):
            conn.execute("SELECT cdc_invalidator.unwatch('users')")
    assert triggers_on(env, "orders") == []
    assert len(triggers_on(env, "users")) == 4


def test_writer_without_queue_privileges_is_captured(env: Env, plain_role: str) -> None:
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    with env.connect() as conn:
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON users TO {}").format(
                sql.Identifier(plain_role)
            )
        )
    assert not env.scalar(
        "SELECT has_schema_privilege(%s, 'cdc_invalidator', 'USAGE')", [plain_role]
    )
    with psycopg.connect(make_conninfo(env.dsn, user=plain_role), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM cdc_invalidator.queue_v1")
        conn.execute("UPDATE users SET email = 'c@x' WHERE id = 1")
        conn.execute("INSERT INTO users VALUES (3, 'd@x', 'D')")
        conn.execute("DELETE FROM users WHERE id = 2")
        conn.execute("TRUNCATE users")
    assert queued(env) == [
        ("users", "U", {"id": "1", "email": "a@x"}, {"id": "1", "email": "c@x"}),
        ("users", "I", None, {"id": "3", "email": "d@x"}),
        ("users", "D", {"id": "2", "email": "b@x"}, None),
        ("users", "T", None, None),
    ]
    # And the listener turns the plain role's change into deletes.
    r = env.redis()
    r.mset({"user:email:a@x": "1", "user:email:c@x": "1", "user:3": "-", "user:9": "T"})
    listener = ListenerThread.from_file(config).start()
    try:
        wait_until(lambda: r.dbsize() == 0, what="every key deleted (the TRUNCATE sweeps user:*)")
        wait_until(lambda: env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 0)
    finally:
        listener.stop()


def test_sql_of_an_older_release_is_refused_until_install_upgrades_it(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Version 1 as a release before packs left it (no schema_revision(), no
    queue_v1.rows): the listener and `check` refuse it with what to do, rather than run
    and misread the queue; `install` upgrades it in place and the listener then runs."""
    tables(env)
    config = env.config(USERS)
    install_older_release(env, config)
    code, _, err = check(config, capsys)
    assert code == 1
    needs = f"this release needs revision {trigger_sql.SCHEMA_REVISION}"
    assert f"v1 revision 1, from an older release; {needs}" in err, err
    result = run_cli("run", "--config", str(config), env={"CDC_INVALIDATOR_LOG_FORMAT": "json"})
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert '"not_installed"' in out, out
    assert "revision 1, from an older release" in out, out
    assert "Traceback" not in out
    assert cli("install", "--config", config) == 0
    code, out, err = check(config, capsys)
    assert code == 0, err
    assert f"cdc_invalidator v1 (revision {trigger_sql.SCHEMA_REVISION}) installed" in out


def test_an_upgrade_from_the_older_release_delivers_its_backlog_and_packs_after(
    env: Env,
) -> None:
    """docs/DBA.md's upgrade order with a backlog: the older release queued changes while
    no listener ran (one row per change, its multi-row statements too); `install`
    upgrades in place, keeping them, and recompiles the capture functions (a multi-row
    statement is now a pack); the new listener then deletes every key of both."""
    tables(env)
    env.sql("INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(10, 31) g")
    config = env.config(USERS)
    install_older_release(env, config)
    r = env.redis()

    def user(i: int, *emails: str) -> list[str]:
        return [f"user:{i}", *(f"user:email:{e}" for e in emails or [f"u{i}@x"])]

    old = [*user(1, "a@x", "c@x"), *user(2, "b@x")]
    old += [k for i in [*range(10, 20), *range(40, 45)] for k in user(i)]
    new = [*user(20, "u20@x", "d@x"), *(k for i in range(21, 30) for k in user(i))]
    kept = [k for i in (30, 31) for k in user(i)]
    r.mset(dict.fromkeys(old + new + kept, "cached"))
    # The backlog, queued while no listener runs (stopped for the upgrade).
    env.sql("UPDATE users SET email = 'c@x' WHERE id = 1")
    env.sql("DELETE FROM users WHERE id = 2")
    env.sql("UPDATE users SET name = 'old' WHERE id BETWEEN 10 AND 19")
    env.sql("INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(40, 44) g")
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 1 + 1 + 10 + 5

    # Upgraded: the backlog kept (no `rows`: one change each), then one change and a
    # pack of nine.
    assert cli("install", "--config", config) == 0
    env.sql("UPDATE users SET email = 'd@x' WHERE id = 20")
    env.sql("DELETE FROM users WHERE id BETWEEN 21 AND 29")
    assert env.scalar(
        "SELECT array_agg(coalesce(rows, 1) ORDER BY id) FROM cdc_invalidator.queue_v1"
    ) == [1] * 18 + [9]

    with listening(config):
        wait_until(
            lambda: (
                r.exists(*old, *new) == 0
                and env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 0
            ),
            what="the backlog's and the new writes' keys deleted, the queue drained",
        )
    assert r.exists(*kept) == len(kept)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_an_install_over_revision_2_starts_the_replay_history_at_the_saved_position(
    env: Env,
) -> None:
    """Revision 2 had no progress_v1: the position it saved, and when (listener_state_v1),
    becomes its first row, so that a replay window starting after that save does not take
    every row kept (a fresh install has no position, and no row)."""
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.progress_v1") == 0
    env.sql(
        "UPDATE cdc_invalidator.listener_state_v1"
        " SET snapshot = pg_current_snapshot(), last_processed_at = now() - interval '1 min';"
        " DROP TABLE cdc_invalidator.progress_v1"
    )
    assert cli("install", "--config", config) == 0
    assert env.scalar(
        "SELECT array_agg(p.at = s.last_processed_at AND p.snapshot::text = s.snapshot::text)"
        " FROM cdc_invalidator.progress_v1 p, cdc_invalidator.listener_state_v1 s"
    ) == [True]
    assert cli("install", "--config", config) == 0  # again: nothing added
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.progress_v1") == 1


def dead_letter_errors(env: Env) -> list[str]:
    with env.connect() as conn:
        return [e for (e,) in conn.execute("SELECT error FROM cdc_invalidator.dead_letter_v1")]


def test_changes_queued_before_install_added_a_template_column_sweep_that_template(
    env: Env,
) -> None:
    """A change queued by the capture function of the mapping before (which copied the
    columns of its templates) and read after `install` gave the table a template of
    another column: its row lacks that column, so those keys cannot be known. It was a
    dead letter, its keys cached (requeued, it failed again): now the new template is
    swept and the others' keys deleted, a one-row change and a statement's pack alike."""
    tables(env)
    env.sql("INSERT INTO users SELECT g, 'u' || g || '@x', 'N' || g FROM generate_series(3, 6) g")
    assert cli("install", "--config", env.config(USERS)) == 0
    env.sql("UPDATE users SET email = 'a2@x' WHERE id = 1")  # one row
    env.sql("UPDATE users SET email = email || '.new' WHERE id BETWEEN 3 AND 6")  # a pack
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE rows > 1") == 1
    wider = env.config({"public.users": [*USERS["public.users"], "user:name:{name}"]})
    assert cli("install", "--config", wider) == 0
    r = env.redis()
    cached = ["user:1", "user:email:a@x", "user:email:a2@x", "user:name:A"]
    for i in range(3, 7):
        cached += [f"user:{i}", f"user:email:u{i}@x", f"user:name:N{i}"]
    untouched = ["order:1", "user:2", "user:email:b@x"]  # rows that did not change
    r.mset(dict.fromkeys([*cached, *untouched], "cached"))
    with listening(wider):
        wait_until(
            lambda: (
                r.exists(*cached) == 0
                and env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 0
            ),
            what="the keys of the changes queued before the install, deleted or swept",
        )
    assert dead_letter_errors(env) == []
    assert r.exists(*untouched) == len(untouched)  # the other templates: not swept


def consuming(env: Env, spawn: Spawn) -> tuple[Path, ListenerProcess]:
    """users and orders, USERS installed, and a listener process seen consuming."""
    tables(env)
    config = env.config(USERS)
    assert cli("install", "--config", config) == 0
    listener = spawn(config)
    r = env.redis()
    r.set("user:email:b2@x", "cached")
    env.sql("UPDATE users SET email = 'b2@x' WHERE id = 2")
    wait_until(lambda: r.exists("user:email:b2@x") == 0, what="the listener consuming")
    return config, listener


def test_a_listener_behind_its_configuration_file_exits_to_restart_with_it(
    env: Env, capture: str, spawn: Spawn
) -> None:
    """docs/DBA.md's order for a new mapping: edit the file, `install`, restart the
    listener. Until the restart, the running listener dead-lettered the changes of a
    table added ("not in the configuration"), and never deleted the keys of a template
    added on a column its capture already copied. It now looks at its file every turn:
    holding other tables, it exits (1, for its service manager to start it again) with
    nothing of a batch acknowledged, and started again, deletes every such key."""
    config, listener = consuming(env, spawn)
    r = env.redis()
    wider = {"public.users": [*USERS["public.users"], "user:name:{name}"], **ORDERS}
    assert env.config(wider) == config  # the same file, edited
    assert listener.wait() == 1
    (line,) = listener.logged("configuration_changed")
    assert "configuration file's tables changed" in line["change"], line
    assert cli("install", "--config", config) == 0
    cached = ["order:1", "user:1:orders", "user:2:orders", "user:name:A", "user:name:A2"]
    r.mset(dict.fromkeys(cached, "cached"))
    env.sql("UPDATE orders SET user_id = 2 WHERE id = 1")
    env.sql("UPDATE users SET name = 'A2' WHERE id = 1")
    again = spawn(config)
    wait_until(lambda: r.exists(*cached) == 0, what="the new mapping's keys deleted")
    assert again.process is not None
    assert again.process.poll() is None
    assert dead_letter_errors(env) == []


def test_a_listener_whose_mapping_a_later_install_replaced_stops_before_acknowledging(
    env: Env, capture: str, spawn: Spawn
) -> None:
    """Listeners whose files are updated one host at a time (a ConfigMap reaching pods at
    different times): `install` of the new file while one still runs the old. It
    rendered what the new capture queued with its old templates and acknowledged it: a
    template added on a column already copied left its keys cached for good. It now
    stops at its next save (exit 1, `configuration_superseded`), nothing acknowledged
    since the install, and a listener with the new file deletes those keys; started
    again on the old file, it stops at once."""
    config, listener = consuming(env, spawn)
    r = env.redis()
    wider = {"public.users": [*USERS["public.users"], "user:name:{name}"]}
    newer = env.config(wider, name="newer.toml")  # another host's copy, updated first
    assert cli("install", "--config", newer) == 0
    r.set("user:name:A2", "cached")
    env.sql("UPDATE users SET name = 'A2' WHERE id = 1")
    assert listener.wait() == 1
    (line,) = listener.logged("configuration_superseded")
    assert "a later `install` replaced this listener's mapping" in line["error"], line
    spawn(newer)
    wait_until(lambda: r.exists("user:name:A2") == 0, what="the new template's key deleted")
    stale = spawn(config)
    assert stale.wait() == 1
    assert stale.logged("configuration_superseded")
    assert dead_letter_errors(env) == []
    said = run_cli("check", "--config", str(config))
    assert said.returncode == 1
    assert "a later `install` replaced this file's mapping" in said.stdout + said.stderr
    assert (
        "its mapping is the one installed last" in run_cli("check", "--config", str(newer)).stdout
    )


def test_a_listener_on_a_file_older_than_the_last_install_stops(
    env: Env, capture: str, spawn: Spawn
) -> None:
    """uninstall takes the record of installed mappings with it; an install of another
    file follows. A listener on the first file found its mapping "not installed", as one
    ahead of install is, ran, and acknowledged with its old templates (a review: keys of
    the new template left cached for good). Its file is older than that install: it
    stops."""
    config, listener = consuming(env, spawn)
    stop_listener(listener)
    assert cli("uninstall", "--config", config) == 0
    wider = {"public.users": [*USERS["public.users"], "user:name:{name}"]}
    assert cli("install", "--config", env.config(wider, name="newer.toml")) == 0
    stale = spawn(config)
    assert stale.wait() == 1
    assert stale.logged("configuration_superseded")
    said = run_cli("check", "--config", str(config))
    assert said.returncode == 1
    assert "or ran with another one after this file was written" in said.stderr, said.stderr


def test_a_listener_ahead_of_install_runs_until_install_catches_up(
    env: Env, capture: str, spawn: Spawn
) -> None:
    """The documented order edits the file first, and install may come much later (a
    DBA reviews the SQL): a listener on a mapping never installed is ahead, not behind,
    and consumes meanwhile."""
    tables(env)
    assert cli("install", "--config", env.config(USERS)) == 0
    ahead = env.config({"public.users": ["user:{id}"]}, name="ahead.toml")
    listener = spawn(ahead)
    r = env.redis()
    r.set("user:1", "cached")
    env.sql("UPDATE users SET email = 'a2@x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="the change consumed")
    assert not listener.logged("configuration_superseded")
    assert listener.process is not None
    assert listener.process.poll() is None
    assert "its mapping is not installed yet" in run_cli("check", "--config", str(ahead)).stdout


def test_uninstall_under_a_running_listener_ends_it_with_not_installed(
    env: Env, spawn: Spawn
) -> None:
    """Trigger mode (logical mode's uninstall refuses while a listener streams):
    `uninstall` while a listener runs. Its next query met a missing relation, and it
    exited with the driver's error on stderr and no log line. It logs `not_installed`,
    saying what to do, as it does when it starts on a database without our objects."""
    config, listener = consuming(env, spawn)
    assert cli("uninstall", "--config", config) == 0
    assert listener.wait() == 1
    (line,) = listener.logged("not_installed")
    assert "run `cdc-invalidator install`" in line["error"], line
    assert "Traceback" not in listener.log_path.read_text()
