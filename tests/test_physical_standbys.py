"""PostgreSQL's physical standbys beside a listener.

A failover, with the listener's database_url listing both servers
(target_session_attrs=read-write), must sweep every watched table: that sweep is what
deletes a value a reader cached from a transaction the failover lost (committed on the
old primary, never received by the standby), for which no change event will ever come.
In logical mode the slot does not exist on the promoted standby, so the listener makes
it again and sweeps (a failover slot kept on the standby, PostgreSQL 17+, would let it
resume without the sweep, and leave that value cached for good: a review reproduced
it). In trigger mode the queue and the position came along with the data: the listener
tells the promoted standby by its new timeline (capture/lineage.py), and queues a sweep
unless sweep_after_failover = false. Going back to the old primary afterwards sweeps
again in both modes: it lacks what was written on the promoted one, and the listener's
previous session saw that one's timeline; a listener started afresh there tells it by
the source mark it keeps in Redis (redis_guard/source.py).

And synchronous_standby_names that would let PostgreSQL make the listener's stream a
synchronous standby: said at every start of the stream."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.env import Env, pg_of
from tests.support.faults import cache, changed_and_deleted, keys_of, setup_users
from tests.support.listener import ListenerProcess, Spawn, run_cli
from tests.support.servers import PostgresServer
from tests.support.waits import wait_until

pytestmark = pytest.mark.usefixtures("capture")


def _receiving(standby: PostgresServer, dbname: str) -> bool:
    with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_wal_receiver").fetchone()
    return bool(row and row[0])


def _caught_up(primary: PostgresServer, standby: PostgresServer, dbname: str) -> bool:
    with psycopg.connect(primary.dsn(dbname), autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
        done = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [row[0]]).fetchone()
    return bool(done and done[0])


def cache_a_change_the_standby_lacks(
    env: Env, primary: PostgresServer, standby: PostgresServer
) -> None:
    """The standby loses its primary once it has what was committed so far; a change
    committed on the primary after (not replicated) has its keys deleted, then a reader
    caches the new row (user:2, user:email:lost@x)."""
    r, dbname = env.redis(), env.dsn.rsplit("/", 1)[1]
    wait_until(lambda: _caught_up(primary, standby, dbname), what="the standby caught up")
    with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1'")
        conn.execute("SELECT pg_reload_conf()")
    wait_until(lambda: not _receiving(standby, dbname), what="the standby cut off")
    cache(r, [2])
    env.sql("UPDATE users SET email = 'lost@x' WHERE id = 2")
    wait_until(lambda: r.exists(*keys_of(2)) == 0, what="the lost change's keys deleted")
    r.mset({"user:2": "lost", "user:email:lost@x": "2"})


def lose_a_change_in_a_failover(
    env: Env, listener: ListenerProcess, primary: PostgresServer, standby: PostgresServer
) -> dict[str, Any]:
    """cache_a_change_the_standby_lacks(), then the primary dies and the standby is
    promoted. Waits for the sweep of that cache; returns the one
    changes_may_have_been_missed line."""
    r = env.redis()
    cache_a_change_the_standby_lacks(env, primary, standby)
    primary.stop("immediate")
    standby.promote()
    wait_until(
        lambda: r.exists("user:2", "user:email:lost@x") == 0,
        timeout_s=30,
        what="the sweep of the lost transaction's cache",
    )
    (missed,) = listener.logged("changes_may_have_been_missed")
    return missed


@pytest.mark.parametrize("afresh", [False, True], ids=["running", "started-afresh"])
def test_a_failover_sweeps_what_a_reader_cached_from_a_transaction_it_lost(
    own_env: Env, spawn: Spawn, afresh: bool
) -> None:
    env = own_env
    primary = pg_of(env)
    dbname = env.dsn.rsplit("/", 1)[1]
    standby = PostgresServer.standby_of(primary)
    try:
        both = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{dbname}"
            "?target_session_attrs=read-write"
        )
        # (no second deletes: the only deletes of a key cached after a change are a sweep's)
        config = setup_users(env, rows=3, database_url=both, second_delete_ms=0, source_mark=True)
        r = env.redis()
        listener = spawn(config)
        changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")

        missed = lose_a_change_in_a_failover(env, listener, primary, standby)
        said = "is gone" if env.logical else "not the one the listener last ran on"
        assert said in missed["reason"], missed
        with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
            assert conn.execute("SELECT email FROM users WHERE id = 2").fetchone() == ("u2@x",)
        changed_and_deleted(r, standby.dsn(dbname), 3, "a change on the new primary")

        # Going back to the old primary (a failover undone): it lacks what was written
        # on the standby, and never saw its timeline. The listener's previous session
        # did: it sweeps again, and a reader's copy of the standby's row goes. One
        # started afresh there: the source mark in Redis says the timeline it saw.
        r.mset({"user:3": "from-the-standby", "user:email:changed3@x": "3"})
        if afresh:
            listener.signal(signal.SIGTERM)
            assert listener.wait() == 0
        standby.stop()
        primary.start()
        if afresh:
            listener = spawn(config)
        wait_until(
            lambda: r.exists("user:3", "user:email:changed3@x") == 0,
            timeout_s=30,
            what="the sweep on going back",
        )
        # (a listener that ran on the standby tells it by both: the source mark too)
        said = (
            "older than the one this Redis was last invalidated from"
            if afresh
            else ("timeline 2; now")
        )
        reasons = [m["reason"] for m in listener.logged("changes_may_have_been_missed")]
        assert any(said in reason for reason in reasons), reasons
        # (row 3's change was made on the standby: on the old primary it is a change again)
        changed_and_deleted(r, env.dsn, 3, "a change on the old primary")
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        standby.destroy()


@pytest.mark.parametrize("capture", ["logical"])
def test_a_listener_that_may_be_made_a_synchronous_standby_says_so_and_streams_on(
    own_env: Env, spawn: Spawn
) -> None:
    """synchronous_standby_names = '*' lets PostgreSQL make the listener's stream a
    synchronous standby, and every commit of the server would wait for it. `check`
    reports it; the listener logs it as it starts streaming, and invalidates as usual
    (its own writes commit asynchronously: they do not wait for it)."""
    env = own_env
    config = setup_users(env, rows=1)
    r = env.redis()
    env.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
    env.sql("SELECT pg_reload_conf()")
    try:
        listener = spawn(config)
        wait_until(lambda: listener.logged("synchronous_standby_candidate"), what="the error")
        (said,) = listener.logged("synchronous_standby_candidate")
        assert said["level"] == "error"
        assert said["synchronous_standby_names"] == "*"
        assert said["application_name"] == "cdc-invalidator"
        # (this test's own write does not wait for the listener)
        first = ["SET synchronous_commit = local"]
        changed_and_deleted(r, env.dsn, 1, "a change's keys deleted", first=first)
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        env.sql("ALTER SYSTEM RESET synchronous_standby_names")
        env.sql("SELECT pg_reload_conf()")


@pytest.mark.parametrize("capture", ["logical"])
def test_a_commit_a_synchronous_standby_holds_back_is_deleted_once_visible(
    own_env: Env, spawn: Spawn
) -> None:
    """The WAL sender streams a commit once it is flushed here; its backend becomes
    visible only once the synchronous standby confirmed it. The listener deleted its
    keys at once (twice, the second 300 ms later), readers cached the old row again
    meanwhile, and nothing deleted it after (a review: a commit held 2 s; a lease's fill
    stayed too). Now its batch waits until a snapshot sees the commit complete: nothing
    is deleted while the standby holds it, and once it lets go the keys go."""
    env = own_env
    config = setup_users(env, rows=2, log_level="debug")
    r = env.redis()
    listener = spawn(config)
    changed_and_deleted(r, env.dsn, 2, "a change's keys deleted, as the listener runs")
    env.sql("ALTER SYSTEM SET synchronous_standby_names = 'standby_that_is_down'")
    env.sql("SELECT pg_reload_conf()")
    writer = psycopg.connect(env.dsn, autocommit=True)
    writer.execute("SET synchronous_commit = on")  # (the test server's is off)
    try:
        wait_until(lambda: listener.logged("commits_seen_before_deletes"), what="told")
        cache(r, [1])
        pid = writer.info.backend_pid
        held = threading.Thread(
            target=writer.execute, args=("UPDATE users SET email = 'new@x' WHERE id = 1",)
        )
        held.start()
        wait_until(
            lambda: env.scalar(
                "SELECT wait_event = 'SyncRep' FROM pg_stat_activity WHERE pid = %s", [pid]
            ),
            what="the commit waiting for the standby",
        )
        wait_until(lambda: listener.logged("commits_not_visible_yet"), what="the batch held")
        # Streamed, not visible: a reader still reads the old row, and caches it.
        assert env.scalar("SELECT email FROM users WHERE id = 1") == "u1@x"
        assert r.exists(*keys_of(1)) == 2, "deleted before the commit was visible"
    finally:
        env.sql("ALTER SYSTEM RESET synchronous_standby_names")
        env.sql("SELECT pg_reload_conf()")
    held.join()
    writer.close()
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="deleted once visible")
    wait_until(lambda: listener.logged("commits_deleted_as_streamed"), what="told again")


def _slot_synced(standby: PostgresServer, dbname: str, env: Env) -> bool:
    """Whether the standby holds a persistent synced copy of the listener's slot (a
    write on the primary first: the slot sync worker needs the slot to move)."""
    env.sql("UPDATE users SET email = email WHERE id = 5")
    with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cdc_invalidator'"
            " AND synced AND NOT temporary AND confirmed_flush_lsn IS NOT NULL"
        ).fetchone()
    return bool(row and row[0])


def _failover_slot_standby(env: Env) -> PostgresServer | None:
    """A standby of the env's server, syncing logical failover slots
    (sync_replication_slots), writers committing synchronously; None before PostgreSQL
    17 (no failover slots: checked so)."""
    if env.scalar("SELECT current_setting('server_version_num')::int") < 170000:
        # (no failover slots before 17; `make test` runs this module on 18 too)
        with pytest.raises(psycopg.errors.UndefinedObject):
            env.sql("SHOW sync_replication_slots")
        return None
    primary = pg_of(env)
    dbname = env.dsn.rsplit("/", 1)[1]
    env.sql("SELECT pg_create_physical_replication_slot('standby')")
    env.sql("ALTER SYSTEM SET synchronous_commit = on")  # (the rig's servers turn it off)
    env.sql("SELECT pg_reload_conf()")
    standby = PostgresServer.standby_of(primary)
    try:
        with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
            conn.execute(
                "ALTER SYSTEM SET primary_conninfo = "
                f"'host=127.0.0.1 port={primary.port} user=postgres dbname={dbname}'"
            )
            conn.execute("ALTER SYSTEM SET primary_slot_name = 'standby'")
            conn.execute("ALTER SYSTEM SET hot_standby_feedback = on")
            conn.execute("ALTER SYSTEM SET sync_replication_slots = on")
            conn.execute("SELECT pg_reload_conf()")
    except BaseException:
        standby.destroy()
        raise
    return standby


def _listener_on_a_failover_slot(
    env: Env, spawn: Spawn, standby: PostgresServer
) -> tuple[Path, ListenerProcess]:
    """The listener's configuration (both servers, the read-write one chosen;
    sweep_after_crash = "auto") and the listener, running, once its slot, made a
    failover slot by hand, is synced to `standby`."""
    primary = pg_of(env)
    dbname = env.dsn.rsplit("/", 1)[1]
    both = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{dbname}"
        "?target_session_attrs=read-write"
    )
    config = setup_users(
        env, rows=5, database_url=both, second_delete_ms=0, sweep_after_crash="auto"
    )
    with psycopg.connect(f"{env.dsn}?replication=database", autocommit=True) as rc:
        done = rc.pgconn.exec_(b"ALTER_REPLICATION_SLOT cdc_invalidator ( FAILOVER true )")
        assert done.status == psycopg.pq.ExecStatus.COMMAND_OK, done.error_message
    r = env.redis()
    listener = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    wait_until(lambda: _slot_synced(standby, dbname, env), timeout_s=90, what="slot synced")
    changed_and_deleted(r, env.dsn, 4, "a change's keys deleted")
    return config, listener


@pytest.mark.parametrize("capture", ["logical"])
def test_a_failover_slot_that_survived_a_promotion_is_swept_for(own_env: Env, spawn: Spawn) -> None:
    """A DBA made the listener's slot a failover slot (PostgreSQL 17+: ALTER_REPLICATION_SLOT
    ... (FAILOVER true), sync_replication_slots on the standby): after the promotion the
    slot is there, and the listener resumed from it without a sweep where writers commit
    synchronously and sweep_after_crash = "auto"; the value a reader cached from a
    transaction the failover lost stayed cached (30 s, for good). A newer timeline than
    the one the listener ran on is now swept for."""
    env = own_env
    standby = _failover_slot_standby(env)
    if standby is None:
        return
    primary = pg_of(env)
    dbname = env.dsn.rsplit("/", 1)[1]
    try:
        _, listener = _listener_on_a_failover_slot(env, spawn, standby)
        r = env.redis()
        missed = lose_a_change_in_a_failover(env, listener, primary, standby)
        assert "the slot survived a promotion" in missed["reason"], missed
        changed_and_deleted(r, standby.dsn(dbname), 3, "a change on the new primary")
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        standby.destroy()


@pytest.mark.parametrize("capture", ["logical"])
def test_a_failover_slot_found_by_a_listener_started_afresh_is_swept_for(
    own_env: Env, spawn: Spawn
) -> None:
    """The same failover slot, but no listener ran through the promotion: the one that
    ran on the old primary went down with it, and a new one (a restarted pod) starts on
    the promoted standby. It has no previous session to compare the timeline with; the
    run mark (an unlogged table, empty after a promotion) told a crash, which
    sweep_after_crash = "auto" does not sweep for where writers commit synchronously:
    it resumed from the synced slot and the value a reader cached from the transaction
    the failover lost stayed cached (30 s, for good). The lineage recorded for the slot
    (slot_state_v1.server_lineage) came with the data: another one is swept for."""
    env = own_env
    standby = _failover_slot_standby(env)
    if standby is None:
        return
    primary = pg_of(env)
    dbname = env.dsn.rsplit("/", 1)[1]
    try:
        config, listener = _listener_on_a_failover_slot(env, spawn, standby)
        r = env.redis()
        cache_a_change_the_standby_lacks(env, primary, standby)
        # The listener goes down with the old primary's host.
        listener.signal(signal.SIGKILL)
        listener.wait()
        primary.stop("immediate")
        standby.promote()

        # `check` says so before the listener's next start does it
        done = run_cli("check", "--config", str(config))
        assert "is not the one the listener last ran on" in done.stdout, done.stdout
        listener = spawn(config)
        changed_and_deleted(r, standby.dsn(dbname), 3, "a change on the new primary")
        with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
            assert conn.execute("SELECT email FROM users WHERE id = 2").fetchone() == ("u2@x",)
        wait_until(
            lambda: r.exists("user:2", "user:email:lost@x") == 0,
            timeout_s=30,
            what="the sweep of the lost transaction's cache",
        )
        reasons = [m["reason"] for m in listener.logged("changes_may_have_been_missed")]
        said = "not the one the listener last ran on"
        assert any(said in reason for reason in reasons), reasons
        # (it streams from the synced slot: not made again)
        assert not listener.logged("slot_created")
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        standby.destroy()
