"""Trigger mode's wake-up while the listener is busy, on real PostgreSQL and Redis.

PostgreSQL serializes the commits of transactions that sent a NOTIFY, so a capture
function sends its wake-up only while the listener is quiet: busy, the listener holds
sql/busy.sql's lock and reads the queue on its own. A writer that found it busy holds
another lock until its transaction ends; the listener, quiet again, polls until
sql/writers_seen.sql says none is open, so that writer's change is read without the
wake-up it never sent (schema.sql's wake_up_v1()).

Whether a writer sent a wake-up is told by order, not by waiting for nothing: a
notification sent after its commit must be the first one a LISTENing session receives.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from cdc_invalidator.capture.trigger_queue import SAVE_EVERY_S, SYNC_CHECK_S, TriggerCapture
from cdc_invalidator.cli import main
from cdc_invalidator.pg.connect import PgConnector
from cdc_invalidator.pg.queries import Q
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.faults import cache, keys_of, payload_channel, queue_count, setup_users
from tests.support.listener import ListenerThread, check
from tests.support.roles import login_role
from tests.support.waits import wait_until

CHANNEL = "cdc_invalidator_v1"
HELD_BY = (  # the second lock, which a writer that found the listener busy holds
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2"
    " AND objid = 2 AND mode = 'ShareLock' AND pid = %s"
)
MARKER = "after the writer"


@contextmanager
def listener_session(env: Env) -> Iterator[psycopg.Connection[Any]]:
    """A session standing for the listener's: it runs the listener's SQL files."""
    with env.connect() as conn:
        yield conn


def holds(conn: psycopg.Connection[Any], query: Q) -> bool:
    row = conn.execute(query.sql).fetchone()
    assert row is not None
    return bool(row[0])


def notifications_until_marker(env: Env, listening: psycopg.Connection[Any]) -> list[str]:
    """What `listening` receives up to MARKER, sent after whatever the caller committed:
    [MARKER] alone if that sent nothing."""
    env.sql("SELECT pg_notify(%s, %s)", [CHANNEL, MARKER])
    payloads: list[str] = []
    for notify in listening.notifies(timeout=10):
        payloads.append(notify.payload)
        if notify.payload == MARKER:
            return payloads
    raise AssertionError(f"no marker within 10 s, only {payloads}")


def test_a_writer_sends_no_wake_up_while_the_listener_is_busy(env: Env) -> None:
    setup_users(env, rows=3)
    with (
        listener_session(env) as listener,
        env.connect() as listening,
    ):
        listening.execute(f"LISTEN {CHANNEL}")
        assert holds(listener, Q.BUSY)
        env.sql("UPDATE users SET email = 'a@x' WHERE id = 1")
        assert notifications_until_marker(env, listening) == [MARKER]
        assert holds(listener, Q.QUIET)
        env.sql("UPDATE users SET email = 'b@x' WHERE id = 2")
        assert notifications_until_marker(env, listening) == ["", MARKER]  # the wake-up


def test_writers_that_found_the_listener_busy_are_seen_out_before_it_stops_polling(
    env: Env,
) -> None:
    setup_users(env, rows=3)
    with (
        listener_session(env) as listener,
        psycopg.connect(env.dsn) as committing,
        psycopg.connect(env.dsn) as rolling_back,
    ):
        assert holds(listener, Q.BUSY)
        committing.execute("UPDATE users SET email = 'a@x' WHERE id = 1")
        rolling_back.execute("UPDATE users SET email = 'b@x' WHERE id = 2")
        assert holds(listener, Q.QUIET)
        assert not holds(listener, Q.WRITERS_SEEN)
        committing.commit()
        assert not holds(listener, Q.WRITERS_SEEN)
        rolling_back.rollback()
        assert holds(listener, Q.WRITERS_SEEN)
        # Quiet now: a writer finds the lock free and takes neither (its transaction open).
        committing.execute("UPDATE users SET email = 'c@x' WHERE id = 3")
        assert holds(listener, Q.WRITERS_SEEN)
        assert env.scalar(HELD_BY, [committing.info.backend_pid]) == 0
        committing.commit()


def test_a_writer_never_waits_for_the_locks_and_wakes_the_listener_where_it_would(
    env: Env,
) -> None:
    """The second lock held exclusive by someone else's session (or by the listener's
    test, for an instant): a writer that found the listener busy sends the wake-up
    instead of waiting (with lock_timeout set, a wait would be an error)."""
    setup_users(env, rows=3)
    with (
        listener_session(env) as listener,
        env.connect() as other,
        env.connect() as listening,
        env.connect() as writer,
    ):
        listening.execute(f"LISTEN {CHANNEL}")
        assert holds(listener, Q.BUSY)
        other.execute("SELECT pg_advisory_lock(hashtext('cdc_invalidator.queue_v1'), 2)")
        writer.execute("SET lock_timeout = '1s'")
        writer.execute("UPDATE users SET email = 'a@x' WHERE id = 1")
        assert notifications_until_marker(env, listening) == ["", MARKER]


BUSY = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2"
    " AND objid = 1 AND mode = 'ExclusiveLock'"
)
CONSUMER = (  # take_lock.sql's: one bigint key, the hash in its low half
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
    " AND objid = hashtext('cdc_invalidator.queue_v1')::oid"
)


@pytest.mark.parametrize("leaving", ["quiet", "session ended"])
def test_a_change_committed_after_the_listener_left_busy_without_a_wake_up_is_deleted(
    env: Env, leaving: str
) -> None:
    """A steady writer keeps the listener busy (batches gathered over batch_linger_ms =
    1000); another writer updates user 1 meanwhile (no wake-up) and stays open while the
    steady one stops and the listener goes quiet, and maybe its session ends and it
    connects again (the other listener of a pair would find the same). Its commit sends
    no wake-up, and the listener's poll comes a minute later (no second deletes either,
    whose timers would wake it): only its polling for the writers that found it busy
    reads it."""
    config = setup_users(
        env, rows=30, poll_interval_ms=60_000, batch_linger_ms=1000, second_delete_ms=0
    )
    r = env.redis()
    stop = threading.Event()

    def steady() -> None:
        with env.connect() as conn:
            i = 0
            while not stop.is_set():
                conn.execute("UPDATE users SET email = email WHERE id = %s", [11 + i % 20])
                i += 1

    def processed(user: int) -> None:
        """A change with its wake-up, read, its row saved and pruned: the listener has
        read since it started or connected, and is past every timer of its own."""
        cache(r, [user])
        env.sql("UPDATE users SET email = email || '.' WHERE id = %s", [user])
        wait_until(
            lambda: not any(r.exists(k) for k in keys_of(user)) and queue_count(env) == 0,
            what=f"user {user}'s change processed",
        )

    listener = ListenerThread.from_file(config).start()
    writing = threading.Thread(target=steady, name="steady writer")
    try:
        processed(3)  # (idle, it has looked for writers left since it connected)
        writing.start()
        wait_until(lambda: env.scalar(BUSY) is not None, what="the listener busy")
        with psycopg.connect(env.dsn) as writer:
            writer.execute("UPDATE users SET email = 'new@x' WHERE id = 1")
            # It found the listener busy (and sent nothing): else this proves nothing.
            assert env.scalar(HELD_BY, [writer.info.backend_pid]) == 1
            stop.set()
            writing.join()
            wait_until(lambda: env.scalar(BUSY) is None, what="the listener quiet")
            # Every committed change read, saved and pruned (so nothing comes again).
            wait_until(lambda: queue_count(env) == 0, what="the steady writes processed")
            if leaving == "session ended":
                ended = env.scalar(CONSUMER)
                env.sql("SELECT pg_terminate_backend(%s)", [ended])
                wait_until(
                    lambda: env.scalar(CONSUMER) not in (None, ended),
                    what="the listener connected again",
                )
            processed(2)
            cache(r, [1])  # a reader caches the old row before the commit
            writer.commit()
        wait_until(lambda: not any(r.exists(k) for k in keys_of(1)), what="user 1's keys gone")
    finally:
        stop.set()
        if writing.is_alive():
            writing.join()
        listener.stop()


def test_install_refuses_a_table_whose_owner_may_not_run_the_wake_up(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The capture function runs as the table's owner and calls the advisory lock
    functions on every write: where a hardened server took EXECUTE from PUBLIC, install
    refuses, naming the function and the role, instead of leaving every write failing."""
    with login_role(env, "owner_") as owner:
        env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
        env.sql(f'ALTER TABLE users OWNER TO "{owner}"')
        taken = "pg_catalog.pg_try_advisory_xact_lock_shared(integer, integer)"
        env.sql(f"REVOKE EXECUTE ON FUNCTION {taken} FROM PUBLIC")
        try:
            config = write_config(
                env.tmp_path / "config.toml",
                database_url=env.dsn,
                redis_url=env.redis_url,
                tables={"public.users": ["user:{id}"]},
            )
            assert main(["install", "--config", str(config)]) != 0
            err = capsys.readouterr().err
            assert owner in err, err
            assert taken in err, err
            env.sql("INSERT INTO users VALUES (1, 'a@x')")  # nothing installed: writes go on
            env.sql(f'GRANT EXECUTE ON FUNCTION {taken} TO "{owner}"')
            assert main(["install", "--config", str(config)]) == 0
            env.sql("UPDATE users SET email = 'b@x' WHERE id = 1")
            capsys.readouterr()
            # Taken away again after install: check names it, with the GRANT.
            env.sql(f'REVOKE EXECUTE ON FUNCTION {taken} FROM "{owner}"')
            code, out, err = check(config, capsys)
            assert code != 0, out
            assert f"GRANT EXECUTE ON FUNCTION {taken} TO {owner}" in err, err
        finally:
            env.sql(f"GRANT EXECUTE ON FUNCTION {taken} TO PUBLIC")


def test_a_payload_is_sent_only_while_the_listener_is_quiet(env: Env) -> None:
    """notify_payload = true: a one-row statement's payload is a notification like the
    wake-up, whose commit waits for the one before; none while the listener is busy."""
    setup_users(env, rows=3, notify_payload=True)
    with (
        listener_session(env) as listener,
        env.connect() as listening,
        psycopg.connect(env.dsn) as writer,
    ):
        listening.execute(f"LISTEN {CHANNEL}")
        listening.execute(f'LISTEN "{payload_channel(env)}"')
        assert holds(listener, Q.BUSY)
        writer.execute("UPDATE users SET email = 'a@x' WHERE id = 1")
        assert not holds(listener, Q.WRITERS_SEEN)  # found it busy: seen out after
        writer.commit()
        assert notifications_until_marker(env, listening) == [MARKER]
        assert holds(listener, Q.QUIET)
        env.sql("UPDATE users SET email = 'b@x' WHERE id = 2")
        # (the payload, then the empty wake-up that goes with it on the wake-up's channel)
        payload, wake_up, marker = notifications_until_marker(env, listening)
        assert json.loads(payload)["r"][0][2] == {"email": "b@x", "id": "2"}
        assert wake_up == ""
        assert marker == MARKER


def test_check_names_a_session_holding_the_wake_up_lock_that_is_no_listener(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Advisory locks need no privilege: any role that can connect may take the busy
    lock, and writers then send no wake-up. check names that session; a listener holding
    it (with the consumer lock) is not named."""
    config = setup_users(env, rows=3)
    _, out, err = check(config, capsys)
    assert "wake-up's lock" not in out + err
    with listener_session(env) as stranger:
        assert holds(stranger, Q.BUSY)
        pid = stranger.info.backend_pid
        _, out, err = check(config, capsys)
        assert f"session pid {pid} " in out + err, out + err
        assert "holds the wake-up's lock 1" in out + err, out + err
        holds(stranger, Q.QUIET)
        # A listener's own (the consumer lock in the same session) is not named.
        assert holds(stranger, Q.TAKE_LOCK)
        assert holds(stranger, Q.BUSY)
        _, out, err = check(config, capsys)
        assert "wake-up's lock" not in out + err, out + err


# How the held writer commits: with synchronous_commit on (as the server says), or
# writing with it local and raising it after its statement (SET LOCAL, or a function
# declared with SET synchronous_commit), which the commit goes by.
HELD = {
    "on": "SET synchronous_commit = on; UPDATE users SET email = 'new1@x' WHERE id = 1",
    "raised-after-the-statement": "BEGIN; SET LOCAL synchronous_commit = local;"
    " UPDATE users SET email = 'new1@x' WHERE id = 1;"
    " SET LOCAL synchronous_commit = on; COMMIT",
}


@pytest.mark.parametrize("held_by", list(HELD))
def test_a_commit_waiting_for_a_synchronous_standby_holds_no_other_writer(
    own_env: Env, held_by: str
) -> None:
    """PostgreSQL holds the commits of transactions that sent a NOTIFY, across the
    server, one at a time until each is done, and a commit with synchronous_commit on
    is done once a synchronous standby answered. With the standby down, a writer's
    commit waited (as it would without us), and one made with synchronous_commit =
    local, which would not have waited, waited behind its wake-up for as long as the
    standby stayed down (a review: 10 s, then until the first was cancelled). The
    commit goes by synchronous_commit at COMMIT, not at the statement (a second review:
    a transaction that wrote with it local and committed with it on held a local
    writer 5 s). While synchronous standbys are configured no capture function sends a
    wake-up: the quiet listener reads the queue every 10 ms, and finds each row once
    its commit is done, without a poll (a minute away here) or a second delete."""
    env = own_env
    config = setup_users(env, rows=3, poll_interval_ms=60_000, second_delete_ms=0)
    r = env.redis()
    env.sql("ALTER SYSTEM SET synchronous_standby_names = 'standby_that_is_down'")
    env.sql("SELECT pg_reload_conf()")
    listener = ListenerThread.from_file(config).start()
    waiting = psycopg.connect(env.dsn, autocommit=True)
    other = psycopg.connect(env.dsn, autocommit=True)
    try:
        cache(r, [3])
        env.sql("UPDATE users SET email = 'quiet@x' WHERE id = 3")  # (the server's: off)
        wait_until(lambda: r.exists(*keys_of(3)) == 0, what="a change deleted, quiet")
        cache(r, [1, 2])
        held = threading.Thread(target=waiting.execute, args=(HELD[held_by],))
        held.start()
        pid = waiting.info.backend_pid
        wait_until(
            lambda: env.scalar(
                "SELECT wait_event = 'SyncRep' FROM pg_stat_activity WHERE pid = %s", [pid]
            ),
            what="the commit waiting for the standby",
        )
        other.execute("SET synchronous_commit = local")
        local = threading.Thread(
            target=other.execute, args=("UPDATE users SET email = 'new2@x' WHERE id = 2",)
        )
        local.start()
        local.join(5)
        assert not local.is_alive(), "a local commit waited behind the held one's wake-up"
        wait_until(lambda: r.exists(*keys_of(2)) == 0, what="the local commit's keys deleted")
        assert r.exists(*keys_of(1)) == 2, "deleted before its commit was visible"
        env.sql("SELECT pg_cancel_backend(%s)", [pid])  # (committed here: visible now)
        held.join(10)
        assert env.scalar("SELECT email FROM users WHERE id = 1") == "new1@x"
        wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the held commit's keys deleted")
    finally:
        env.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        env.sql("ALTER SYSTEM RESET synchronous_standby_names")
        env.sql("SELECT pg_reload_conf()")
        waiting.close()
        other.close()
        listener.stop()


def test_synchronous_standbys_configured_under_a_quiet_listener_are_noticed_within_a_second(
    own_env: Env,
) -> None:
    """synchronous_standby_names set while the listener waits, quiet (ALTER SYSTEM and a
    reload): from then on no commit sends a wake-up, and the listener, which asked
    whether standbys were configured only before waiting, slept on until its poll (a
    review, poll_interval_ms = 60000: a local commit's keys stayed 57.7 s; 8 ms before
    the setting, 11 ms once the listener knew). It asks again once a second while it
    waits, and reads every 10 ms once it finds them configured."""
    env = own_env
    config = setup_users(env, rows=3, poll_interval_ms=60_000, second_delete_ms=0)
    r = env.redis()
    listener = ListenerThread.from_file(config).start()
    try:
        cache(r, [1])
        env.sql("UPDATE users SET email = 'before@x' WHERE id = 1")
        wait_until(lambda: r.exists(*keys_of(1)) == 0, what="a change deleted (wake-up)")
        time.sleep(1.5)  # the listener waits for its next poll, a minute away
        env.sql("ALTER SYSTEM SET synchronous_standby_names = 'standby_that_is_down'")
        env.sql("SELECT pg_reload_conf()")
        cache(r, [2])
        with psycopg.connect(env.dsn, autocommit=True) as writer:
            writer.execute("SET synchronous_commit = local")  # (would wait for nobody)
            writer.execute("UPDATE users SET email = 'after@x' WHERE id = 2")
        started = time.monotonic()
        wait_until(lambda: r.exists(*keys_of(2)) == 0, timeout_s=10, what="deleted, set")
        assert time.monotonic() - started < 2.5
    finally:
        env.sql("ALTER SYSTEM RESET synchronous_standby_names")
        env.sql("SELECT pg_reload_conf()")
        listener.stop()


def test_a_wake_up_read_with_the_standby_question_ends_the_wait(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet listener asks whether synchronous standbys are configured (sync_standbys.sql)
    before it waits, and once a second while it waits. A wake-up that reaches it while
    it asks is read by psycopg with that query's answer, not off the idle socket: the
    wait then slept on, watching a socket with nothing left on it, until its poll. So a
    change committed between a starting listener's second read and its first question
    kept its keys until the poll (a probe: 3 of 400 starts; the likely cause of
    test_faults.py's restart test failing on a tmpfs), and, once a second, a change
    committed while it asked did too.
    Committed before the question is sent, its notification comes with the answer at
    the latest."""
    setup_users(env, rows=3)
    pg = PgConnector(env.dsn, application_name="test-wakeup", connect_timeout_s=5)
    queue = TriggerCapture(pg).connect()
    try:
        with queue.batch(100) as batch:  # the first read
            assert batch.size == 0
        queue.wait(5.0)  # returns once writers_seen.sql finds no writer left (at once)
        assert queue._writers_poll_s is None
        with queue.batch(100) as batch:  # the read after it: quiet, nothing to save
            assert batch.size == 0
        env.sql("UPDATE users SET email = 'woken@x' WHERE id = 1")
        started = time.monotonic()
        queue.wait(3 * SYNC_CHECK_S)
        waited = time.monotonic() - started
        assert waited < SYNC_CHECK_S / 2, f"the wake-up was left unread for {waited:.2f} s"
        with queue.batch(100) as batch:
            assert batch.size == 1

        # Asked again while it waits (once a second): a change committed just before.
        time.sleep(SAVE_EVERY_S)
        queue.maintain()  # (its progress saved: no save due cuts the wait short)
        committed: list[float] = []
        ask = queue._synced

        def commit_then_ask() -> bool:
            if not committed and time.monotonic() - queue._sync_asked_at >= SYNC_CHECK_S:
                env.sql("UPDATE users SET email = 'woken again@x' WHERE id = 2")
                committed.append(time.monotonic())
            return ask()

        monkeypatch.setattr(queue, "_synced", commit_then_ask)
        queue.wait(3 * SYNC_CHECK_S)
        assert committed, "not asked again within the wait"
        waited = time.monotonic() - committed[0]
        assert waited < SYNC_CHECK_S / 2, f"the wake-up was left unread for {waited:.2f} s"
        with queue.batch(100) as batch:
            assert batch.size == 1
    finally:
        queue.close()
