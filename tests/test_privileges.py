"""Least privilege: the listener as a role that may only consume our queue (trigger mode)
or stream the slot (logical mode), granted by cdc_invalidator.grant_listener(); install
run by the DBA's role. Every test runs in both capture modes.

The listener runs as a real process with its own DSN. Writers are a plain role too, with
privileges on their tables and none on our schema: the trigger functions (SECURITY
DEFINER) write the queue for them.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_invalidator.capture.early import EarlyBatch
from cdc_invalidator.cli import main
from cdc_invalidator.runner import Batch
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.faults import listener_quiet
from tests.support.listener import ListenerProcess, ListenerThread, Spawn, run_cli, stop_listener
from tests.support.roles import login_role
from tests.support.servers import free_port
from tests.support.waits import wait_until

pytestmark = pytest.mark.usefixtures("capture")

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}
# Watched (triggers, or published) but left out of the listener's configuration: its
# changes become dead letters.
GHOST = {"public.ghost": ["ghost:{id}"]}

# Exactly what grant_listener() grants, per mode: relation -> privileges.
TRIGGER_GRANTS = {
    "queue_v1": {"SELECT", "DELETE"},
    "listener_state_v1": {"SELECT", "UPDATE"},
    "progress_v1": {"SELECT", "INSERT", "DELETE"},
    "dead_letter_v1": {"SELECT", "INSERT", "UPDATE"},
    "watched_v1": {"SELECT"},
    "redis_identity_v1": {"SELECT", "INSERT", "UPDATE"},
}
LOGICAL_GRANTS = {
    "slot_state_v1": {"SELECT", "INSERT", "UPDATE"},
    "published_v1": {"SELECT"},
    "history_v1": {"SELECT", "INSERT", "DELETE"},
    "dead_letter_v1": {"SELECT", "INSERT"},
    "logical_dead_letter_v1": {"USAGE"},
    "redis_identity_v1": {"SELECT", "INSERT", "UPDATE"},
}


@pytest.fixture
def listener_role(env: Env) -> Iterator[str]:
    """A login role, no superuser; in logical mode with REPLICATION. Nothing granted."""
    with login_role(env, "cdc_listener_", "REPLICATION" if env.logical else "") as role:
        yield role


@pytest.fixture
def writer_role(env: Env) -> Iterator[str]:
    """An application's role: privileges on its tables, none on our schema."""
    with login_role(env, "app_writer_") as role:
        yield role


def as_role(env: Env, role: str) -> str:
    return make_conninfo(env.dsn, user=role)


def tables(env: Env, writer: str | None = None) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        "CREATE TABLE ghost (id int PRIMARY KEY);"
        "INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B'), (3, 'c@x', 'C')"
    )
    if writer is not None:
        env.sql(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON users, ghost TO {}")
            .format(sql.Identifier(writer))
            .as_string(None)
        )


def config(
    env: Env,
    tables: Mapping[str, Sequence[str]],
    *,
    name: str = "config.toml",
    role: str | None = None,
    **settings: object,
) -> Path:
    mode: dict[str, object] = {"capture": "logical"} if env.logical else {}
    return write_config(
        env.tmp_path / name,
        database_url=as_role(env, role) if role else env.dsn,
        redis_url=env.redis_url,
        tables=tables,
        **{**mode, **settings},
    )


def install(env: Env) -> Path:
    """As the DBA: the superuser that owns the tables."""
    path = config(env, {**USERS, **GHOST}, name="dba.toml")
    assert main(["install", "--config", str(path)]) == 0
    return path


def grant(env: Env, role: str, capture: str | None = None) -> None:
    env.sql("SELECT cdc_invalidator.grant_listener(%s, %s)", [role, capture or env.capture])


def granted(env: Env, role: str) -> dict[str, set[str]]:
    """Every privilege `role` holds on a relation or sequence of our schema."""
    with env.connect() as conn:
        rows = conn.execute(
            """SELECT c.relname, a.privilege_type
               FROM pg_class c, aclexplode(c.relacl) a
               WHERE c.relnamespace = 'cdc_invalidator'::regnamespace
                 AND a.grantee = %s::regrole""",
            [role],
        ).fetchall()
    out: dict[str, set[str]] = {}
    for relname, privilege in rows:
        out.setdefault(relname, set()).add(privilege)
    return out


def stop(listener: ListenerProcess) -> None:
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


def assert_stops_with_a_clear_error(listener: ListenerProcess, *needles: str) -> str:
    """Not an outage to wait out: one `cannot_consume` line, exit 1, no traceback."""
    assert listener.wait() == 1
    fatal = listener.logged("cannot_consume")
    assert len(fatal) == 1, listener.lines()
    assert fatal[0]["level"] == "error"
    error = str(fatal[0]["error"])
    for needle in needles:
        assert needle in error, error
    assert listener.logged("postgres_unavailable") == []
    assert not any(line["event"] == "<non-json>" for line in listener.lines()), "no traceback"
    return error


# --- the listener as the least-privilege role ----------------------------------------------


def test_listener_as_least_privilege_role_invalidates_and_keeps_its_books(
    env: Env, spawn: Spawn, listener_role: str, writer_role: str
) -> None:
    tables(env, writer_role)
    dba = install(env)
    grant(env, listener_role)
    # Grants outlive running install again: nothing of ours is re-created.
    assert main(["install", "--config", str(dba)]) == 0
    assert granted(env, listener_role) == (LOGICAL_GRANTS if env.logical else TRIGGER_GRANTS)
    assert not env.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [listener_role])

    # The listener knows users only, and the installed mapping's templates are not
    # recorded (as an earlier release's install left it): ghost's changes cannot become
    # keys (dead letters).
    env.sql("UPDATE cdc_invalidator.mapping_v1 SET tables = NULL")
    # History kept a few seconds, so that it is written, read back and pruned here.
    heartbeat: dict[str, object] = {"heartbeat_interval_ms": 100} if env.logical else {}
    own = config(
        env, USERS, name="listener.toml", role=listener_role, replay_history="4s", **heartbeat
    )
    r = env.redis()
    r.mset({f"user:{i}": "-" for i in (1, 2, 3, 4)})
    r.mset({"user:email:a@x": "1", "user:email:b@x": "2", "user:email:z@x": "1"})
    listener = spawn(own)
    if env.logical:
        wait_until(
            lambda: env.scalar(
                "SELECT active_pid IS NOT NULL FROM pg_replication_slots"
                " WHERE slot_name = 'cdc_invalidator'"
            ),
            what="the role streaming the slot",
        )

    with psycopg.connect(as_role(env, writer_role), autocommit=True) as writer:
        writer.execute("INSERT INTO users VALUES (4, 'd@x', 'D')")
        writer.execute("UPDATE users SET email = 'z@x' WHERE id = 1")
        writer.execute("DELETE FROM users WHERE id = 2")
        wait_until(
            lambda: (
                r.exists("user:4", "user:1", "user:email:a@x", "user:email:z@x") == 0
                and r.exists("user:2", "user:email:b@x") == 0
            ),
            what="INSERT, UPDATE and DELETE invalidated",
        )
        assert r.exists("user:3") == 1
        writer.execute("TRUNCATE users")
        wait_until(lambda: r.exists("user:3") == 0, what="the TRUNCATE sweep")
        with writer.transaction():
            writer.execute("INSERT INTO ghost VALUES (7)")
            before_commit = writer.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        assert before_commit is not None
    wait_until(
        lambda: env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 1,
        what="a dead letter written by the role",
    )
    assert env.scalar("SELECT table_name FROM cdc_invalidator.dead_letter_v1") == "ghost"

    # Progress saved.
    if env.logical:
        wait_until(
            lambda: env.scalar(
                "SELECT events_processed >= 5 AND acked_lsn > %s AND confirmed_flush_lsn > %s"
                " FROM cdc_invalidator.slot_state_v1 JOIN pg_replication_slots USING (slot_name)",
                [before_commit[0], before_commit[0]],
            ),
            what="the slot's position saved and confirmed",
        )
        assert env.scalar("SELECT count(*) FROM cdc_invalidator.history_v1") > 0
    else:
        wait_until(
            lambda: env.scalar(
                "SELECT events_processed >= 5 AND last_processed_at IS NOT NULL"
                " FROM cdc_invalidator.listener_state_v1"
            ),
            what="the listener's progress saved",
        )
    identity = env.scalar("SELECT identity FROM cdc_invalidator.redis_identity_v1")
    assert identity, "Redis' identity recorded by the role"

    # The operator's read-only commands run as the role too.
    status = run_cli("status", "--json", "--config", str(own))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dead_letters"] == 1
    replayed = run_cli("replay", "--since", "1m", "--config", str(own))
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed " in replayed.stdout, replayed.stdout
    checked = run_cli(
        "check",
        "--config",
        str(config(env, {**USERS, **GHOST}, role=listener_role, name="all.toml")),
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Processed changes pruned once past replay_history.
    kept = (
        "SELECT count(*) FROM cdc_invalidator.history_v1"
        if env.logical
        else "SELECT count(*) FROM cdc_invalidator.queue_v1"
    )
    wait_until(lambda: env.scalar(kept) == 0, what="processed changes pruned by the role")
    stop(listener)

    # Redis came back as another server while the listener was down: on its start the
    # role reads the old identity, replays and saves the new one (UPDATE).
    env.sql("UPDATE cdc_invalidator.redis_identity_v1 SET identity = 'another server'")
    listener = spawn(own)
    wait_until(lambda: listener.logged("replay_done"), what="the replay after Redis changed")
    # (saved once the replay's sweeps are done, after replay_done: a clean-clone run met
    # it not yet saved)
    wait_until(
        lambda: env.scalar("SELECT identity FROM cdc_invalidator.redis_identity_v1") == identity,
        what="the new identity saved by the role",
    )
    # Trigger mode: as it started, it redid its predecessor's owed second deletes with
    # the role's grants (sql/redo_trigger.sql reads listener_state_v1). (Logical mode's
    # history was pruned above: nothing acknowledged to redo.) It is logged just after
    # replay_done, by the same step: waited for, not read at once.
    if not env.logical:
        wait_until(lambda: listener.logged("second_deletes_redone"), what="the redo")
    stop(listener)


def revision(number: int, removed: str) -> str:
    """What revision `number` left installed, as the current install less `removed`
    (what came after it)."""
    return (
        removed
        + "CREATE OR REPLACE FUNCTION cdc_invalidator.schema_revision() RETURNS integer"
        + f" LANGUAGE sql IMMUTABLE AS 'SELECT {number}';"
    )


# Revision 9 (before retired_table_v1() and the slot's server_lineage), revision 8
# (before recorded_in_database), revision 7 (before note_server_v3() and recorded_in),
# revision 6 (before note_server_v2() and the server's run) and revision 2 (before
# progress_v1).
REVISION_9 = revision(
    9,
    """
    DROP FUNCTION cdc_invalidator.retired_table_v1(text);
    ALTER TABLE cdc_invalidator.mapping_v1 DROP COLUMN tables;
    ALTER TABLE IF EXISTS cdc_invalidator.slot_state_v1 DROP COLUMN IF EXISTS server_lineage;
    """,
)
REVISION_8 = REVISION_9 + revision(
    8,
    """
    ALTER TABLE cdc_invalidator.listener_state_v1 DROP COLUMN recorded_in_database;
    ALTER TABLE IF EXISTS cdc_invalidator.slot_state_v1 DROP COLUMN IF EXISTS recorded_in_database;
    DROP FUNCTION cdc_invalidator.database_oid_v1();
    """,
)
REVISION_7 = REVISION_8 + revision(
    7,
    """
    DROP FUNCTION cdc_invalidator.note_server_v3(boolean, text, boolean);
    ALTER TABLE cdc_invalidator.listener_state_v1 DROP COLUMN recorded_in;
    ALTER TABLE IF EXISTS cdc_invalidator.slot_state_v1 DROP COLUMN IF EXISTS recorded_in;
    CREATE FUNCTION cdc_invalidator.note_server_v2(boolean, text, boolean) RETURNS void
    LANGUAGE sql AS '';
    """,
)
REVISION_6 = REVISION_7 + revision(
    6,
    """
    DROP FUNCTION cdc_invalidator.note_server_v2(boolean, text, boolean);
    DROP FUNCTION cdc_invalidator.server_run_v1();
    DROP TABLE cdc_invalidator.server_run_v1;
    ALTER TABLE cdc_invalidator.listener_state_v1 DROP COLUMN server_run;
    """,
)
REVISION_2 = REVISION_6 + revision(2, "DROP TABLE cdc_invalidator.progress_v1;")


# Functions a role that may create in public (the database's owner on PostgreSQL 15,
# every role on a database made before it) puts beside PostgreSQL's own, with argument
# types our queries' calls match exactly, where PostgreSQL's match through a cast or a
# polymorphic type: under a default search_path they are chosen, and run as the session's
# role (the review's deleted queue rows, and moved the slot's saved position).
SHADOWS = """
CREATE TABLE public.shadowed (fn text);
GRANT INSERT ON public.shadowed TO PUBLIC;
CREATE FUNCTION public.json_build_array(a bigint, b double precision) RETURNS json
LANGUAGE plpgsql AS $$BEGIN
    INSERT INTO public.shadowed VALUES ('json_build_array');
    RETURN pg_catalog.json_build_array(a, b);
END$$;
CREATE FUNCTION public.array_position(a text[], e text) RETURNS int
LANGUAGE plpgsql AS $$BEGIN
    INSERT INTO public.shadowed VALUES ('array_position');
    RETURN pg_catalog.array_position(a, e);
END$$;
CREATE FUNCTION public.quote_ident(n name) RETURNS text
LANGUAGE plpgsql AS $$BEGIN
    INSERT INTO public.shadowed VALUES ('quote_ident');
    RETURN pg_catalog.quote_ident(n::text);
END$$;
"""


def test_functions_another_role_put_in_public_never_run_in_our_sessions(
    env: Env, spawn: Spawn
) -> None:
    """Every session of ours pins search_path to pg_catalog: the listener's, its
    bookkeeping's and check's call PostgreSQL's functions, whatever public holds."""
    tables(env)
    dba = install(env)
    env.sql(SHADOWS)
    r = env.redis()
    r.mset({"user:1": "-", "user:email:a@x": "-", "user:email:z@x": "-"})
    listener = spawn(dba)
    env.sql("UPDATE users SET email = 'z@x' WHERE id = 1")
    wait_until(
        lambda: r.exists("user:1", "user:email:a@x", "user:email:z@x") == 0,
        what="the UPDATE invalidated",
    )
    assert run_cli("check", "--config", str(dba)).returncode in (0, 1)
    assert run_cli("status", "--config", str(dba)).returncode == 0
    stop(listener)
    assert env.scalar("SELECT array_agg(DISTINCT fn) FROM public.shadowed") is None


@pytest.mark.parametrize("capture", ["trigger"])  # progress_v1 is trigger mode's
@pytest.mark.parametrize(
    "older",
    [REVISION_2, REVISION_6, REVISION_7, REVISION_8],
    ids=["revision 2", "revision 6", "revision 7", "revision 8"],
)
def test_an_upgrade_keeps_the_listeners_grants_and_its_backlog(
    env: Env, spawn: Spawn, listener_role: str, writer_role: str, older: str
) -> None:
    """docs/DBA.md's upgrade order, with a backlog queued and the listener's role granted
    by the older release: `install` adds progress_v1 (revision 3) and note_server_v3()
    (revision 8) and gives them to that role, whose listener then drains the backlog and
    saves its progress there (no grant_listener call in between). The upgrade sweeps
    nothing: install records the table and database the listener's row is in
    (recorded_in, recorded_in_database), as they were."""
    tables(env, writer_role)
    dba = install(env)
    grant(env, listener_role)
    env.sql(older)
    r = env.redis()
    r.mset({"user:1": "-", "user:email:a@x": "1"})
    with psycopg.connect(as_role(env, writer_role), autocommit=True) as writer:
        writer.execute("UPDATE users SET email = 'z@x' WHERE id = 1")  # no listener runs
    assert main(["install", "--config", str(dba)]) == 0
    assert granted(env, listener_role) == TRIGGER_GRANTS
    assert env.scalar("SELECT to_regproc('cdc_invalidator.note_server_v2') IS NULL")
    listener = spawn(config(env, USERS, name="listener.toml", role=listener_role))
    wait_until(lambda: r.exists("user:1", "user:email:a@x") == 0, what="the backlog's keys")
    wait_until(
        lambda: env.scalar("SELECT count(*) FROM cdc_invalidator.progress_v1") > 0,
        what="the role's progress saved for replay",
    )
    assert not listener.logged("changes_may_have_been_missed")
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE op = 'T'") == 0
    stop(listener)


@pytest.mark.parametrize("capture", ["logical"])
def test_an_upgrade_gives_a_logical_listener_a_function_public_may_not_call(
    env: Env, spawn: Spawn, listener_role: str, writer_role: str
) -> None:
    """A logical listener's role granted by revision 8, where the installing role's
    default privileges keep EXECUTE on new functions from PUBLIC: install gives it
    database_oid_v1() (revision 9), which it calls at each connect, with no grant_listener
    call in between (a review: it stopped on "permission denied for function
    database_oid_v1")."""
    tables(env, writer_role)
    dba = install(env)
    grant(env, listener_role)
    env.sql(REVISION_8 + "ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;")
    assert main(["install", "--config", str(dba)]) == 0
    assert not env.scalar(
        "SELECT has_function_privilege('public', 'cdc_invalidator.database_oid_v1()', 'EXECUTE')"
    )
    r = env.redis()
    listener = spawn(config(env, USERS, name="listener.toml", role=listener_role))
    r.mset({"user:1": "-", "user:email:a@x": "1"})
    with psycopg.connect(as_role(env, writer_role), autocommit=True) as writer:
        writer.execute("UPDATE users SET email = 'z@x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1", "user:email:a@x") == 0, what="the change's keys")
    assert not listener.logged("cannot_consume")
    stop(listener)


def test_an_upgrade_gives_the_listener_the_templates_of_a_table_its_file_dropped(
    env: Env, spawn: Spawn, listener_role: str, writer_role: str
) -> None:
    """A listener role granted by revision 9, before retired_table_v1() (which PUBLIC
    may not call): install gives it, with no grant_listener call in between, and the
    listener, started on a file without ghost, renders a change of ghost committed while
    it was still watched with the templates that install recorded."""
    tables(env, writer_role)
    dba = install(env)
    grant(env, listener_role)
    env.sql(REVISION_9)
    assert main(["install", "--config", str(dba)]) == 0
    assert not env.scalar(
        "SELECT has_function_privilege('public', 'cdc_invalidator.retired_table_v1(text)',"
        " 'EXECUTE')"
    )
    r = env.redis()
    r.mset({"user:1": "-", "ghost:7": "-"})
    listener = spawn(config(env, USERS, name="listener.toml", role=listener_role))
    with psycopg.connect(as_role(env, writer_role), autocommit=True) as writer:
        writer.execute("INSERT INTO ghost VALUES (7)")
        writer.execute("UPDATE users SET name = 'z' WHERE id = 1")
    wait_until(lambda: r.exists("user:1", "ghost:7") == 0, what="both tables' keys")
    assert listener.logged("rendering_a_table_no_longer_configured")
    assert not listener.logged("retired_table_refused")
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
    stop(listener)


def with_filter(path: Path, line: str) -> Path:
    """The config at `path`, its users section given a column filter (TOML `line`)."""
    text = path.read_text()
    header = '[tables."public.users"]\n'
    assert header in text
    path.write_text(text.replace(header, header + line + "\n"))
    return path


def test_a_filtered_table_under_the_least_privilege_listener(
    env: Env, spawn: Spawn, listener_role: str, writer_role: str
) -> None:
    """A column filter needs no grant more: the writer's UPDATEs are judged by our
    capture (trigger mode) or the decoder (logical mode), and the least-privilege
    listener deletes what counts and spares what does not."""
    tables(env, writer_role)
    dba = with_filter(config(env, {**USERS, **GHOST}, name="dba.toml"), 'ignore_columns = ["name"]')
    assert main(["install", "--config", str(dba)]) == 0
    grant(env, listener_role)
    assert granted(env, listener_role) == (LOGICAL_GRANTS if env.logical else TRIGGER_GRANTS)
    own = with_filter(
        config(env, USERS, name="listener.toml", role=listener_role), 'ignore_columns = ["name"]'
    )
    r = env.redis()
    r.mset({"user:1": "-", "user:2": "-", "user:email:b@x": "2", "user:email:new@x": "-"})
    listener = spawn(own)
    with psycopg.connect(as_role(env, writer_role), autocommit=True) as writer:
        writer.execute("UPDATE users SET name = 'ignored' WHERE id = 1")
        writer.execute("UPDATE users SET email = 'new@x' WHERE id = 2")
    wait_until(
        lambda: r.exists("user:2", "user:email:b@x", "user:email:new@x") == 0,
        what="the counted change invalidated",
    )
    # Judged in order: the later change is done, so the earlier one was skipped.
    assert r.get("user:1") == "-"
    assert listener.logged("cannot_consume") == []
    stop(listener)  # and it exits 0


def test_a_table_under_forced_row_level_security_is_captured_whatever_its_policies(
    env: Env, spawn: Spawn, writer_role: str
) -> None:
    """Row-level security, forced on the table's owner too (a role of its own, no
    superuser), with policies that let the application's role see and write some rows
    only: each of its writes is captured, and a DBA's change of a row they hide from
    it."""
    with login_role(env, "app_owner_") as owner:
        tables(env, writer_role)
        env.sql(
            sql.SQL(
                "ALTER TABLE users OWNER TO {owner};"
                "ALTER TABLE users ENABLE ROW LEVEL SECURITY;"
                "ALTER TABLE users FORCE ROW LEVEL SECURITY;"
                "CREATE POLICY mine ON users TO {writer} USING (id < 3) WITH CHECK (id < 5)"
            )
            .format(owner=sql.Identifier(owner), writer=sql.Identifier(writer_role))
            .as_string(None)
        )
        dba = config(env, USERS, name="dba.toml")
        assert main(["install", "--config", str(dba)]) == 0
        r = env.redis()
        changed = ["user:1", "user:email:a@x", "user:2", "user:email:b@x", "user:4"]
        r.mset(dict.fromkeys([*changed, "user:email:new@x", "user:3", "user:email:c@x"], "-"))
        listener = spawn(dba)
        with psycopg.connect(as_role(env, writer_role), autocommit=True) as writer:
            writer.execute("UPDATE users SET email = 'new@x' WHERE id = 1")
            writer.execute("DELETE FROM users WHERE id = 2")
            writer.execute("INSERT INTO users (id, email) VALUES (4, 'd@x')")
            # row 3 is not the writer's to see: nothing changed, nothing deleted
            writer.execute("UPDATE users SET name = 'x' WHERE id = 3")
        wait_until(lambda: r.exists(*changed, "user:email:new@x") == 0, what="the writer's changes")
        assert r.get("user:3") == "-"
        env.sql("UPDATE users SET name = 'y' WHERE id = 3")  # a DBA's (superuser) change
        wait_until(lambda: r.exists("user:3", "user:email:c@x") == 0, what="row 3's keys")
        assert listener.logged("cannot_consume") == []
        stop(listener)


def test_listener_role_may_do_nothing_else(env: Env, listener_role: str) -> None:
    tables(env)
    install(env)
    grant(env, listener_role)
    denied = [
        # the application's data
        "SELECT * FROM users",
        "UPDATE users SET name = 'x'",
        # our queue and records, beyond consuming them
        "INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op)"
        " VALUES ('public', 'users', 'T')",
        "TRUNCATE cdc_invalidator.queue_v1",
        "DELETE FROM cdc_invalidator.dead_letter_v1",
        "UPDATE cdc_invalidator.dead_letter_v1 SET error = 'x'"
        if env.logical
        else "DELETE FROM cdc_invalidator.listener_state_v1",
        "DROP TABLE cdc_invalidator.queue_v1",
        "ALTER TABLE cdc_invalidator.dead_letter_v1 ADD COLUMN x int",
        "CREATE TABLE cdc_invalidator.mine (id int)",
        # triggers, the publication, grants
        "SELECT cdc_invalidator.watch('users', ARRAY['id'])",
        "SELECT cdc_invalidator.unwatch('users')",
        f"SELECT cdc_invalidator.grant_listener('{listener_role}', 'trigger')",
        "DROP PUBLICATION IF EXISTS cdc_invalidator"
        if env.logical
        else "DROP TRIGGER cdc_invalidator_ins_v1 ON users",
    ]
    with psycopg.connect(as_role(env, listener_role), autocommit=True) as conn:
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())
        if env.logical:
            # Nothing of the trigger queue, which this mode does not use.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT count(*) FROM cdc_invalidator.queue_v1")
        else:
            # No replication: no slot, no stream of the whole database's changes.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT pg_create_logical_replication_slot('mine', 'pgoutput')")
    assert env.scalar("SELECT count(*) FROM users") == 3


# Our SECURITY DEFINER functions (not the trigger functions, which no one can call) that
# `role` may run.
DEFINER_GRANTED = """
    SELECT coalesce(array_agg(p.proname::text ORDER BY p.proname), '{}')
    FROM pg_proc p, aclexplode(p.proacl) a
    WHERE p.pronamespace = 'cdc_invalidator'::regnamespace AND p.prosecdef
      AND p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype)
      AND a.grantee = %s::regrole"""


def test_the_installers_default_privileges_give_no_role_our_definer_functions(
    env: Env, listener_role: str
) -> None:
    """ALTER DEFAULT PRIVILEGES ... GRANT EXECUTE ON FUNCTIONS TO app (the installing
    role's) gave `app` every SECURITY DEFINER function install made: as the installing
    role, it could unwatch() a table it does not own, whose changes then went by
    uncaptured. Install takes such grants back, and keeps what it gives on purpose: the
    listener's role its functions (it is a grantee of the same default privileges here),
    a watched table's owner notify_row_v1()."""
    with login_role(env, "app_") as app:
        idents = [sql.Identifier(app), sql.Identifier(listener_role)]
        env.sql(
            sql.SQL("ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO {}, {}")
            .format(*idents)
            .as_string(None)
        )
        try:
            tables(env)
            env.sql(sql.SQL("ALTER TABLE ghost OWNER TO {}").format(idents[0]).as_string(None))
            path = install(env)
            grant(env, listener_role)
            assert main(["install", "--config", str(path)]) == 0  # an upgrade's second run
            with psycopg.connect(as_role(env, app), autocommit=True) as conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT cdc_invalidator.unwatch('users')")
                conn.execute("INSERT INTO ghost VALUES (1), (2)")  # its own table's writes
            if not env.logical:
                triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'users'::regclass"
                assert env.scalar(triggers) == 4  # still watched
            expected = [] if env.logical else ["notify_row_v1"]
            assert env.scalar(DEFINER_GRANTED, [app]) == expected
            kept = set(env.scalar(DEFINER_GRANTED, [listener_role]))
            assert kept == (
                {"mapping_eras_v1", "retired_table_v1", "server_run_v1"}
                | (set() if env.logical else {"listen_v1", "note_server_v3"})
            )
        finally:
            env.sql(
                sql.SQL("ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM {}, {}")
                .format(*idents)
                .as_string(None)
            )


# --- missing grants: a clear message, not a traceback, not a retry loop ---------------------


def test_listener_without_grants_stops_with_a_clear_error(
    env: Env, spawn: Spawn, listener_role: str
) -> None:
    tables(env)
    install(env)
    own = config(env, USERS, name="listener.toml", role=listener_role)
    listener = spawn(own)
    assert_stops_with_a_clear_error(
        listener,
        listener_role,
        "permission denied for schema cdc_invalidator",
        f"cdc_invalidator.grant_listener('{listener_role}', '{env.capture}')",
    )
    for command in ("status", "check"):
        result = run_cli(command, "--config", str(own))
        assert result.returncode == 1, result
        assert "permission denied" in result.stderr
        assert "grant_listener" in result.stderr
        assert "Traceback" not in result.stderr

    # Granted, a new start works.
    grant(env, listener_role)
    r = env.redis()
    r.set("user:1", "-")
    listener = spawn(own)
    env.sql("UPDATE users SET name = 'x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="an invalidation once granted")
    stop(listener)


def test_a_grant_revoked_under_a_running_listener_stops_it_with_a_clear_error(
    env: Env, spawn: Spawn, listener_role: str
) -> None:
    tables(env)
    install(env)
    grant(env, listener_role)
    own = config(env, USERS, name="listener.toml", role=listener_role)
    r = env.redis()
    r.set("user:1", "-")
    listener = spawn(own)
    env.sql("UPDATE users SET name = 'x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="the first invalidation")
    # Its progress cannot be saved any more: that is for a person to fix, not to retry.
    table = "slot_state_v1" if env.logical else "listener_state_v1"
    env.sql(
        sql.SQL("REVOKE UPDATE ON cdc_invalidator.{} FROM {}")
        .format(sql.Identifier(table), sql.Identifier(listener_role))
        .as_string(None)
    )
    env.sql("UPDATE users SET name = 'x' WHERE id = 2")
    assert_stops_with_a_clear_error(
        listener, f"permission denied for table {table}", "grant_listener"
    )


# --- grant_listener() itself -----------------------------------------------------------------


def test_grant_listener_grants_exactly_one_mode_and_refuses_nonsense(
    env: Env, listener_role: str
) -> None:
    tables(env)
    install(env)

    def notices(capture: str) -> list[str]:
        with env.connect() as conn:
            seen: list[str] = []
            conn.add_notice_handler(lambda d: seen.append(str(d.message_primary)))
            conn.execute("SELECT cdc_invalidator.grant_listener(%s, %s)", [listener_role, capture])
            return seen

    assert notices(env.capture) == []
    if env.logical:
        # A logical install has the trigger queue's tables too: switching modes leaves
        # only the new mode's set.
        notices("trigger")
        assert granted(env, listener_role) == TRIGGER_GRANTS
        notices("logical")
        assert granted(env, listener_role) == LOGICAL_GRANTS
        env.sql(
            sql.SQL("ALTER ROLE {} NOREPLICATION")
            .format(sql.Identifier(listener_role))
            .as_string(None)
        )
        assert any("needs REPLICATION" in n for n in notices("logical"))
    else:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not installed"):
            grant(env, listener_role, "logical")
        assert granted(env, listener_role) == TRIGGER_GRANTS
    env.sql(
        "REVOKE CONNECT ON DATABASE "
        + sql.Identifier(env.scalar("SELECT current_database()")).as_string(None)
        + " FROM PUBLIC"
    )
    assert any("may not connect" in n for n in notices(env.capture))

    with pytest.raises(psycopg.errors.InvalidParameterValue, match="'trigger' or 'logical'"):
        grant(env, listener_role, "both")
    owner = env.scalar("SELECT current_user")
    owned = granted(env, owner)
    with pytest.raises(psycopg.errors.InvalidGrantOperation, match="owns cdc_invalidator"):
        grant(env, owner)
    with pytest.raises(psycopg.errors.UndefinedObject):
        grant(env, "public")
    assert granted(env, owner) == owned != {}, "the owner's privileges are untouched"


def test_sql_output_installs_grant_listener_for_psql(env: Env) -> None:
    tables(env)
    path = config(env, {**USERS, **GHOST}, name="dba.toml")
    result = run_cli("sql", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "CREATE OR REPLACE FUNCTION cdc_invalidator.grant_listener(" in result.stdout
    assert "SELECT cdc_invalidator.grant_listener('cdc_listener'" in result.stdout


@pytest.mark.parametrize("capture", ["logical"])  # trigger mode needs no replication
def test_rds_replication_membership_counts_as_replication(env: Env, listener_role: str) -> None:
    """Amazon RDS grants replication by membership in rds_replication, not the attribute:
    `check` and grant_listener() must not send the DBA after REPLICATION there. (Only the
    advice is tested: plain PostgreSQL gives such a member no replication.)"""
    assert env.logical
    tables(env)
    install(env)
    ident = sql.Identifier(listener_role)
    with env.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} NOREPLICATION").format(ident))
        exists = conn.execute("SELECT FROM pg_roles WHERE rolname = 'rds_replication'").fetchone()
        if exists is None:
            conn.execute("CREATE ROLE rds_replication")
    try:
        own = config(env, USERS, name="listener.toml", role=listener_role)
        grant(env, listener_role)
        result = run_cli("check", "--config", str(own))
        assert "lacks the REPLICATION attribute" in result.stderr
        with env.connect() as conn:
            conn.execute(sql.SQL("GRANT rds_replication TO {}").format(ident))
            seen: list[str] = []
            conn.add_notice_handler(lambda d: seen.append(str(d.message_primary)))
            conn.execute("SELECT cdc_invalidator.grant_listener(%s, 'logical')", [listener_role])
        assert not any("REPLICATION" in n for n in seen), seen
        result = run_cli("check", "--config", str(own))
        # (PostgreSQL itself refuses the replication connection `check` opens here, and
        # says why: plain PostgreSQL gives such a member no replication)
        assert "lacks the REPLICATION attribute" not in result.stderr, result.stderr
        assert "ALTER ROLE" not in result.stderr, result.stderr
    finally:
        if exists is None:
            with env.connect() as conn:
                conn.execute("DROP ROLE rds_replication")


def test_uninstall_by_another_role_than_the_superuser_that_installed_says_whose_it_is(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a squatter's schema: the role running it is not the installer. It said the
    superuser's objects were "not owned by the installing role", and to drop or reassign
    them, as for a schema another role planted."""
    tables(env)
    install(env)
    with login_role(env, "owner_") as role:
        # (the listener's role, say: it may use the schema)
        env.sql(f"SELECT cdc_invalidator.grant_listener('{role}', '{env.capture}')")
        path = config(env, USERS, name="role.toml", role=role)
        capsys.readouterr()
        assert main(["uninstall", "--config", str(path)]) == 1
        err = capsys.readouterr().err
    assert f'refusing to uninstall as role "{role}": it was installed by role' in err, err
    assert "drop or reassign" not in err
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator') IS NOT NULL")


@pytest.mark.parametrize("capture", ["trigger"])  # the same lookup in both modes
def test_check_names_the_application_schema_a_role_may_not_use(
    env: Env, listener_role: str
) -> None:
    """A configured table in a schema the listener's role has no USAGE on: check sent the
    DBA to grant_listener(), which grants only our schema and did not help (a review
    following the docs). It names the schema and the GRANT."""
    env.sql("CREATE SCHEMA shop; CREATE TABLE shop.orders (id int PRIMARY KEY)")
    dba = config(env, {"shop.orders": ["order:{id}"]}, name="dba.toml")
    assert main(["install", "--config", str(dba)]) == 0
    env.sql(
        sql.SQL("SELECT cdc_invalidator.grant_listener({}, 'trigger')")
        .format(sql.Literal(listener_role))
        .as_string(None)
    )
    mine = config(env, {"shop.orders": ["order:{id}"]}, name="mine.toml", role=listener_role)
    out = run_cli("check", "--config", str(mine))
    said = out.stdout + out.stderr
    assert out.returncode != 0, said
    assert "permission denied for schema shop" in said, said
    assert "GRANT USAGE ON SCHEMA shop TO the listener's role" in said, said


def test_the_listener_keeps_its_sessions_whatever_timeouts_its_role_carries(
    env: Env, spawn: Spawn, listener_role: str
) -> None:
    """A DBA's settings for forgotten sessions and accidental writes, on the listener's
    role: the listener idles between changes, holds a transaction while a replay's keys
    are deleted, and writes its books. Each of these had it reconnect in a loop, or exit
    at its first write while `check` saw nothing wrong (a review). So did `replay`, run
    as that role while Redis was slow."""
    tables(env)
    install(env)
    grant(env, listener_role)
    settings = {
        "idle_session_timeout": "200ms",
        "idle_in_transaction_session_timeout": "100ms",
        "default_transaction_read_only": "on",
    }
    if env.scalar("SELECT current_setting('server_version_num')::int") >= 170000:
        settings["transaction_timeout"] = "200ms"
    for name, value in settings.items():
        env.sql(
            sql.SQL("ALTER ROLE {} SET {} = {}")
            .format(sql.Identifier(listener_role), sql.Identifier(name), sql.Literal(value))
            .as_string(None)
        )
    r = env.redis()
    port = free_port()
    own = config(
        env,
        USERS,
        name="listener.toml",
        role=listener_role,
        metrics_port=port,
        replay_history="10m",
    )
    listener = spawn(own)
    for i in (1, 2, 3):
        r.set(f"user:{i}", "-")
        env.sql("UPDATE users SET name = 'x' WHERE id = %s", [i])
        wait_until(lambda i=i: r.exists(f"user:{i}") == 0, what=f"user:{i} deleted")  # type: ignore[misc]
        # The metrics' session read (its figures are kept a second), then idle past
        # every timeout above (this builds the case; it waits on nothing).
        assert status_up(port) == 1
        time.sleep(1.2)
    stop_listener(listener)
    assert listener.logged("postgres_unavailable") == []
    assert listener.logged("metrics_status_failed") == []
    # `replay` holds a transaction while it deletes: with Redis slow to take them (its
    # writes paused), it idles in it past the role's timeout.
    r.set("user:1", "back")
    r.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
    done = run_cli("replay", "--since", "5m", "--config", str(own))
    assert done.returncode == 0, done.stderr
    assert r.exists("user:1") == 0, (done.stdout, done.stderr)


def serializable_writes(env: Env, seconds: float) -> int:
    """Four serializable writers for `seconds`, each changing rows of its own of users
    (id 1000 on) and reading a few others in one transaction: their read/write
    dependencies make pivots now and then. How many transactions committed."""
    stop = threading.Event()
    done = [0]

    def write(n: int) -> None:
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            conn.execute("SET default_transaction_isolation = 'serializable'")
            i = 0
            while not stop.is_set():
                base = 1000 + n * 500
                try:
                    conn.execute(
                        "UPDATE users SET name = name || 'z' WHERE id = %s", [base + i % 500]
                    )
                    with conn.transaction():
                        conn.execute(
                            "UPDATE users SET name = 'w' WHERE id = %s", [base + (i * 7) % 500]
                        )
                        conn.execute("SELECT count(*) FROM users WHERE id < 1010")
                    done[0] += 1
                except psycopg.errors.SerializationFailure:
                    pass  # (theirs among themselves: an application retries)
                i += 1

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(10)
    return done[0]


def test_the_listener_reads_in_read_committed_whatever_isolation_its_role_defaults_to(
    env: Env, spawn: Spawn, listener_role: str
) -> None:
    """default_transaction_isolation = serializable on the listener's role (or its
    database), set while it ran, then a reconnect: its reads of the queue took part in
    serializable writers' read/write dependencies and were cancelled now and then
    ("Canceled on conflict out to pivot ..."), each a reconnect logged as
    postgres_unavailable with the keys waiting for the back-off (a review, PostgreSQL
    15: 5 to 16 in 8 s of four such writers). Its sessions set read committed."""
    tables(env)
    env.sql("INSERT INTO users SELECT g, 'e' || g, 'n' FROM generate_series(1000, 2999) g")
    install(env)
    grant(env, listener_role)
    listener = spawn(config(env, USERS, name="listener.toml", role=listener_role))
    r = env.redis()
    r.set("user:1", "-")
    env.sql("UPDATE users SET name = 'x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="user:1 deleted")
    env.sql(
        sql.SQL("ALTER ROLE {} SET default_transaction_isolation = 'serializable'")
        .format(sql.Identifier(listener_role))
        .as_string(None)
    )
    env.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [listener_role]
    )
    r.set("user:2", "-")
    env.sql("UPDATE users SET name = 'x' WHERE id = 2")
    wait_until(lambda: r.exists("user:2") == 0, what="user:2 deleted (reconnected)")
    before = len(listener.logged("postgres_unavailable"))
    assert serializable_writes(env, 8.0) > 100
    r.set("user:3", "-")
    env.sql("UPDATE users SET name = 'x' WHERE id = 3")
    wait_until(lambda: r.exists("user:3") == 0, what="user:3 deleted")
    stop_listener(listener)
    assert listener.logged("postgres_unavailable")[before:] == []


def status_up(port: int) -> float:
    """cdc_invalidator_status_up as the listener's metrics say it now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^cdc_invalidator_status_up (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


@pytest.mark.parametrize("capture", ["logical"])  # held_back_by is logical mode's
def test_status_as_a_role_without_pg_read_all_stats_says_it_cannot_see(
    env: Env, listener_role: str
) -> None:
    """`status` as the least-privilege listener role (no pg_read_all_stats), while the
    DBA's session held a transaction id for seconds (keeping the slot's WAL): it said
    "WAL held back by: no transaction open over a second" (by hand on PG 15.18 and
    18.6): PostgreSQL hides other roles' transaction ids from it. It says now that it
    cannot see them."""
    tables(env)
    install(env)
    grant(env, listener_role)
    own = config(env, {**USERS, **GHOST}, name="own.toml", role=listener_role)
    with env.connect() as conn, conn.transaction():
        conn.execute("SELECT pg_current_xact_id()")
        time.sleep(1.5)
        result = run_cli("status", "--config", str(own))
        as_dba = run_cli("status", "--config", str(env.tmp_path / "dba.toml"))
    assert result.returncode == 0, result.stderr
    assert "no transaction open over a second" not in result.stdout
    assert "lacks pg_read_all_stats" in result.stdout
    assert re.search(r"WAL held back by: +pid \d+", as_dba.stdout), as_dba.stdout


# A function of a schema that the listener role's search_path names before pg_catalog
# (ALTER ROLE ... SET search_path), where a role other than ours may create: shaped like
# the one the listener's sessions called before pinning their own search_path, and run
# as the listener, it deletes the queue's rows (trigger mode) and says it ran.
SHADOWED_AT_CONNECT = """
CREATE SCHEMA shady;
GRANT USAGE ON SCHEMA shady TO PUBLIC;
CREATE TABLE shady.ran (at timestamptz DEFAULT now());
GRANT INSERT ON shady.ran TO PUBLIC;
CREATE FUNCTION shady.pg_is_in_recovery() RETURNS boolean
LANGUAGE plpgsql AS $$BEGIN
    INSERT INTO shady.ran DEFAULT VALUES;
    BEGIN
        DELETE FROM cdc_invalidator.queue_v1;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN false;
END$$;
"""


def test_a_search_path_set_on_the_listeners_role_runs_none_of_its_functions_at_connect(
    env: Env, spawn: Spawn, listener_role: str
) -> None:
    """The listener's sessions pin search_path = pg_catalog, but asked whether the
    server is a standby (`SELECT pg_is_in_recovery()`) before that, under the role's
    own search_path: with `ALTER ROLE ... SET search_path = shady, pg_catalog` a
    function shady.pg_is_in_recovery() ran as the listener at every connect (a review,
    PostgreSQL 15: in trigger mode it deleted the queue, and an UPDATE committed while
    the listener was down kept its keys cached). Every query before the pin now names
    pg_catalog."""
    tables(env)
    dba = install(env)
    grant(env, listener_role)
    env.sql(SHADOWED_AT_CONNECT)
    env.sql(
        sql.SQL("ALTER ROLE {} SET search_path = shady, pg_catalog")
        .format(sql.Identifier(listener_role))
        .as_string(None)
    )
    r = env.redis()
    r.mset({"user:1": "-", "user:email:a@x": "-", "user:email:z@x": "-"})
    env.sql("UPDATE users SET email = 'z@x' WHERE id = 1")  # while no listener runs
    listener = spawn(config(env, USERS, name="listener.toml", role=listener_role))
    wait_until(
        lambda: r.exists("user:1", "user:email:a@x", "user:email:z@x") == 0,
        what="the UPDATE invalidated",
        timeout_s=10,
    )
    stop(listener)
    assert env.scalar("SELECT count(*) FROM shady.ran") == 0
    assert dba.exists()


class EarlyTap:
    """The runner's Tap: counts the early batches (NOTIFY payloads' changes, deleted
    before the queue read)."""

    def __init__(self) -> None:
        self.early = 0

    def after(self, batch: Batch) -> None:
        if isinstance(batch, EarlyBatch):
            self.early += 1

    def close(self) -> None:
        pass


@pytest.mark.parametrize("capture", ["trigger"])  # the NOTIFY payload is trigger mode's
def test_the_least_privilege_listener_hears_the_payloads_on_a_channel_it_may_not_name(
    env: Env, listener_role: str
) -> None:
    """notify_payload on: the listener, as the role grant_listener made, LISTENs on the
    payloads' channel through listen_v1() and deletes a one-row change from its payload,
    before the queue read; that role may not read the channel's name."""
    tables(env)
    dba = config(env, USERS, name="dba.toml", notify_payload=True)
    assert main(["install", "--config", str(dba)]) == 0
    grant(env, listener_role)
    r = env.redis()
    listener = ListenerThread.from_file(
        config(env, USERS, name="listener.toml", role=listener_role, notify_payload=True)
    )
    tap = EarlyTap()
    listener.runner._tap = tap  # the runner's own hook, as `tail` uses it
    listener.start()
    try:
        # A queue read that meets the row first (the listener reads once more after it
        # goes quiet) leaves the payload nothing to do: 1 of 8 runs here. A few writes
        # make that chance small; without listen_v1() none is ever deleted early.
        for attempt in range(5):
            wait_until(
                lambda: listener.runner.active and listener_quiet(env), what="the listener quiet"
            )
            r.set("user:1", "-")
            env.sql("UPDATE users SET name = %s WHERE id = 1", [f"n{attempt}"])
            wait_until(lambda: r.exists("user:1") == 0, what="the key deleted")
            if tap.early:
                break
        assert tap.early >= 1
    finally:
        listener.stop()
    with (
        psycopg.connect(as_role(env, listener_role)) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT channel FROM cdc_invalidator.payload_channel_v1")


def test_the_least_privilege_listener_renders_templates_an_install_replaced(
    env: Env, spawn: Spawn, listener_role: str
) -> None:
    """ghost installed with ghost:{id}, a change of it queued (no listener running),
    install with ghost:{id} replaced by other:{id}: the listener, as the role
    grant_listener made, is given the earlier templates (mapping_eras_v1(), not
    PUBLIC's) and deletes ghost:7 as well as other:7."""
    tables(env)
    first = config(env, {**USERS, **GHOST}, name="dba.toml")
    assert main(["install", "--config", str(first)]) == 0
    grant(env, listener_role)
    assert not env.scalar(
        "SELECT has_function_privilege('public',"
        " 'cdc_invalidator.mapping_eras_v1(text, jsonb, text)', 'EXECUTE')"
    )
    r = env.redis()
    r.mset({"user:1": "-", "ghost:7": "-", "other:7": "-"})
    env.sql("INSERT INTO ghost VALUES (7)")
    replaced = {**USERS, "public.ghost": ["other:{id}"]}
    assert main(["install", "--config", str(config(env, replaced, name="dba2.toml"))]) == 0
    env.sql("UPDATE users SET name = 'z' WHERE id = 1")
    listener = spawn(config(env, replaced, name="listener.toml", role=listener_role))
    wait_until(lambda: r.exists("user:1", "other:7") == 0, what="the listener caught up")
    wait_until(lambda: r.exists("ghost:7") == 0, what="ghost:7 deleted", timeout_s=2)
    assert listener.logged("rendering_changes_of_earlier_mappings")
    stop(listener)
