"""Both modes: a sweep after PostgreSQL came up from a crash, where this database's writers
commit asynchronously (capture/lineage.py, server_run_v1() and note_server_v3() in
sql/schema.sql), against real servers.

A commit made with synchronous_commit = off is visible before its WAL is flushed; a
crash in between loses it after a reader may have cached its row, and neither capture
mode ever sees it (its queue row goes with it; logical decoding reads flushed WAL only).
The server's run (a mark in an unlogged table, which crash recovery empties) is
recorded beside the lineage;
the listener compares it at each connect, and sweeps every watched table once for
another one: always (sweep_after_crash = "always", the default), where the server's, the
database's or a role's settings turn asynchronous commits on ("auto"), or never. A clean restart
keeps the run. The test servers commit asynchronously by their own configuration
(FAST_PG)."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
from psycopg.conninfo import make_conninfo

from tests.support.config import write_config
from tests.support.env import Env, pg_of, recovered_from
from tests.support.faults import (
    TEMPLATES,
    acknowledged,
    cache,
    changed_and_deleted,
    email,
    keys_of,
    setup_users,
    write,
)
from tests.support.listener import Spawn, stop_listener
from tests.support.roles import login_role
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

RUN = "SELECT cdc_invalidator.server_run_v1()"
LONG_AGO = "1000"  # a run recorded before some crash: 1970-01-01T00:16:40


def recorded(env: Env) -> str | None:
    """The run the listener (or install) last noted: per slot in logical mode."""
    table = "slot_state_v1" if env.logical else "listener_state_v1"
    value = env.scalar(f"SELECT server_run FROM cdc_invalidator.{table}")
    assert value is None or isinstance(value, str)
    return value


def record(env: Env, run: str) -> None:
    table = "slot_state_v1" if env.logical else "listener_state_v1"
    env.sql(f"UPDATE cdc_invalidator.{table} SET server_run = '{run}'")


def test_install_records_the_lineage_and_the_run_and_a_listener_on_them_sweeps_nothing(
    env: Env, spawn: Spawn
) -> None:
    """(The lineage is recorded in trigger mode: logical mode's slot tells a new server.)"""
    config = setup_users(env, rows=3)
    run = env.scalar(RUN)
    assert run is not None
    assert recorded(env) == run
    if not env.logical:
        here = env.scalar("SELECT cdc_invalidator.server_lineage_v1()")
        assert " timeline " in here
        lineage = "SELECT server_lineage FROM cdc_invalidator.listener_state_v1"
        assert env.scalar(lineage) == here
    r = env.redis()
    cache(r, [2, 3])
    listener = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert r.exists(*keys_of(2), *keys_of(3)) == 4, "nothing swept"
    assert not listener.logged("changes_may_have_been_missed")
    assert not listener.logged("postgres_recovered")
    if not env.logical:
        resyncs = "SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE new_row::jsonb ? 'resync'"
        assert env.scalar(resyncs) == 0
    stop_listener(listener)


@pytest.mark.parametrize(
    ("setting", "synchronous", "swept"),
    [
        (None, True, True),  # the default: always
        ("auto", False, True),  # the server's configuration: off (FAST_PG)
        ("auto", True, False),  # the database's setting: on, which its sessions take
        ("always", True, True),  # sessions may SET it off themselves, unseen
        ("never", False, False),
    ],
)
def test_a_run_recorded_before_a_crash(
    env: Env, spawn: Spawn, setting: str | None, synchronous: bool, swept: bool
) -> None:
    """Another run than the one recorded: swept for once where the setting says so, or
    said; recorded either way, so that the next start sweeps nothing."""
    config = setup_users(env, rows=3, **({} if setting is None else {"sweep_after_crash": setting}))
    if synchronous:
        db = env.scalar("SELECT current_database()")
        env.sql(f'ALTER DATABASE "{db}" SET synchronous_commit = on')
    record(env, LONG_AGO)
    r = env.redis()
    cache(r, [2, 3])
    listener = spawn(config)
    if swept:
        wait_until(lambda: r.exists(*keys_of(2), *keys_of(3)) == 0, what="every key swept")
        (missed,) = listener.logged("changes_may_have_been_missed")
        assert missed["level"] == "error"
        reason = missed["reason"]
        assert "PostgreSQL crashed since the listener last noted it" in reason, reason
        assert "the run it noted at 1970-01-01T00:16:40+00:00 is gone" in reason, reason
        if setting == "auto":
            assert "(the server's configuration (configuration file))" in reason, reason
        else:
            assert "sweep_after_crash = always: any session may" in reason, reason
        changed_and_deleted(r, env.dsn, 1, "a change's keys deleted after the sweep")
    else:
        changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
        assert r.exists(*keys_of(2), *keys_of(3)) == 4, "nothing swept"
        assert not listener.logged("changes_may_have_been_missed")
        (said,) = listener.logged("postgres_recovered")
        assert said["level"] == "warning"
        assert "PostgreSQL crashed since" in said["reason"]
    assert recorded(env) == env.scalar(RUN)
    stop_listener(listener)
    # Started again on the same run: nothing more. (A sweep in the last seconds before
    # a stop may be done again, as the predecessor's second deletes.)
    cache(r, [2])
    again = spawn(config)
    changed_and_deleted(r, env.dsn, 3, "a change's keys deleted")
    if not swept:
        assert r.exists(*keys_of(2)) == 2, "nothing swept"
    assert not again.logged("changes_may_have_been_missed")
    assert not again.logged("postgres_recovered")
    stop_listener(again)


def test_a_listener_whose_role_has_its_own_setting_takes_the_servers_as_off(
    env: Env, spawn: Spawn
) -> None:
    """A setting of the listener's own role (synchronous_commit = local) hides the
    server's (off: FAST_PG) from its sessions, not from other roles' writers (a review):
    unknown, counted as off, and swept for (sweep_after_crash = auto)."""
    setup_users(env, rows=3)
    assert not env.scalar(
        "SELECT has_function_privilege('public', 'cdc_invalidator.server_run_v1()', 'EXECUTE')"
    ), "granted to listener roles only: a caller holding the mark's insert would hold them"
    record(env, LONG_AGO)
    r = env.redis()
    cache(r, [2, 3])
    with login_role(env, "own_setting_", "REPLICATION" if env.logical else "") as role:
        env.sql(f'ALTER ROLE "{role}" SET synchronous_commit = local')
        env.sql("SELECT cdc_invalidator.grant_listener(%s, %s)", [role, env.capture])
        mode: dict[str, object] = {"capture": env.capture} if env.logical else {}
        config = write_config(
            env.tmp_path / "as-role.toml",
            database_url=make_conninfo(env.dsn, user=role),
            redis_url=env.redis_url,
            tables={"public.users": TEMPLATES},
            sweep_after_crash="auto",
            **mode,
        )
        listener = spawn(config)
        wait_until(lambda: r.exists(*keys_of(2), *keys_of(3)) == 0, what="every key swept")
        (missed,) = listener.logged("changes_may_have_been_missed")
        assert (
            "which this session's own user setting hides (unknown, so counted as off)"
            in (missed["reason"])
        )
        stop_listener(listener)


def test_a_crash_sweeps_what_a_reader_cached_and_a_clean_restart_does_not(
    own_env: Env, spawn: Spawn
) -> None:
    """A real crash loses a real asynchronous commit that a reader saw and cached: the
    WAL writer stopped, the commit stays in WAL buffers, and the WAL writer killed (a
    crash of one backend: the postmaster ends every session and recovers). The listener
    reconnects and sweeps it away; a clean restart after that sweeps nothing."""
    env = own_env
    # (no second deletes: the only deletes of a key cached after a change are a sweep's)
    config = setup_users(env, rows=3, second_delete_ms=0)
    before = env.scalar(RUN)
    r = env.redis()
    listener = spawn(config)
    changed_and_deleted(r, env.dsn, 3, "a change's keys deleted")
    # Statistics reset by hand (one kind, every kind) are no crash.
    env.sql("SELECT pg_stat_reset_shared('bgwriter'); SELECT pg_stat_reset_shared('archiver')")
    assert env.scalar(RUN) == before
    walwriter = env.scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'")
    assert isinstance(walwriter, int)
    env.sql("CHECKPOINT")  # what came before is on disk
    os.kill(walwriter, signal.SIGSTOP)  # what commits from now on stays in WAL buffers
    try:
        r.mset({"user:2": "stale", "user:email:lost@x": "stale"})
        env.sql("UPDATE users SET email = 'lost@x' WHERE id = 2")  # (asynchronous: FAST_PG)
        if not env.logical:  # (logical decoding reads flushed WAL only: never sent)
            wait_until(lambda: r.exists("user:2", "user:email:lost@x") == 0, what="deleted")
        # A reader reads the committed row, and caches it.
        assert env.scalar("SELECT email FROM users WHERE id = 2") == "lost@x"
        r.mset({"user:2": "lost@x", "user:email:lost@x": "2"})
    finally:
        # (SIGKILL ends a stopped process too; the postmaster may reap it first)
        os.kill(walwriter, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(walwriter, signal.SIGCONT)
    wait_until(lambda: recovered_from(env, walwriter), what="PostgreSQL recovered")
    assert env.scalar("SELECT email FROM users WHERE id = 2") == email(2), "the commit lost"
    assert env.scalar(RUN) not in (None, before), "a crash empties unlogged tables"
    wait_until(
        lambda: r.exists("user:2", "user:email:lost@x") == 0,
        timeout_s=30,
        what="the sweep of the lost commit's cached row",
    )
    # (One sweep. In logical mode the crash may also lose the listener's last save, which
    # commits asynchronously, after it told the slot: the slot ahead of it owes the same.)
    (missed,) = listener.logged("changes_may_have_been_missed")
    assert "PostgreSQL crashed since" in missed["reason"] or (
        env.logical and "the last position this listener saved" in missed["reason"]
    ), missed
    changed_and_deleted(r, env.dsn, 1, "a change after the crash")
    assert recorded(env) == env.scalar(RUN)
    # Acknowledged past the sweep: a restart resumes from the position saved, and would
    # do the sweep again otherwise (harmlessly).
    written = write(env, "UPDATE users SET email = 'w1@x' WHERE id = 1", ids=range(1, 2))
    wait_until(lambda: acknowledged(env, written), what="the sweep acknowledged")

    pg = pg_of(env)
    run = env.scalar(RUN)
    pg.restart()  # (fast: a clean shutdown)
    assert env.scalar(RUN) == run, "a clean restart keeps the run"
    cache(r, [2])
    r.set("user:3", "cached")
    env.sql("UPDATE users SET email = 'after@x' WHERE id = 3")
    wait_until(lambda: r.exists("user:3") == 0, what="a change after the restart")
    assert r.exists(*keys_of(2)) == 2, "nothing swept"
    assert len(listener.logged("changes_may_have_been_missed")) == 1
    assert not listener.logged("postgres_recovered")
    stop_listener(listener)
