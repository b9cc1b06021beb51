"""Trigger mode's NOTIFY-payload fast path, on real PostgreSQL and Redis.

With `notify_payload = true`, a statement that changed one row hands its queue row to
the listener in the NOTIFY payload, on a channel whose name only the installing role
may read (the empty wake-up's, which anyone may LISTEN on, carries none); the listener
deletes its keys at once (an early batch) and the queue read that follows acknowledges
it without deleting them again. A statement of several rows (queued in packs) sends the
plain wake-up. These tests look at both ends: the payload a separate LISTEN connection
receives, and the batches the runner hands its tap (which sees early batches too; an
early batch's positions are its own, a queue batch's are queue ids), and count the
UNLINKs Redis ran.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from cdc_invalidator.capture.early import (
    EarlyBatch,
    EarlyChanges,
    Sender,
    content,
    early_batch,
    visible_in,
)
from cdc_invalidator.capture.rows import RowDecoder
from cdc_invalidator.capture.trigger_queue import QueueBatch, TriggerCapture
from cdc_invalidator.cli import main
from cdc_invalidator.events import ChangeEvent, Op, TableName
from cdc_invalidator.mapping import KeyTemplate, Mapper
from cdc_invalidator.pg.connect import PgConnector
from cdc_invalidator.runner import Batch, Runner, RunnerConfig, Source
from cdc_invalidator.shutdown import Stopper
from tests.support.env import Env
from tests.support.faults import (
    NOTIFY_ROW,
    cache,
    forged_payload,
    insert_users,
    keys_of,
    listener_quiet,
    payload_channel,
    queue_count,
    setup_users,
    update_without_notify,
    write,
)
from tests.support.listener import ListenerThread
from tests.support.runner_fakes import RecordingSink
from tests.support.sync import keys
from tests.support.waits import wait_until

CHANNEL = "cdc_invalidator_v1"
WARM_UP = 999  # the user id of listener_with_tap's first change
KEEP_QUEUE = 3_600_000  # prune_every_ms: the queue's rows stay for the test to read


class RecordingTap:
    """The runner's Tap: notes each batch's kind and its events' positions (an early
    batch's: those it deleted, not those it left to the queue read)."""

    def __init__(self) -> None:
        self.batches: list[tuple[bool, list[int]]] = []

    def after(self, batch: Batch) -> None:
        if isinstance(batch, EarlyBatch):
            # (a change the mapper refused is tapped too, but left: not deleted early)
            self.batches.append(
                (True, [e.position for e in batch.events if e.position not in batch.left])
            )
            return
        # A trigger batch's packs mapped column-wise are no `events`: all_events() has them.
        every = batch.all_events() if isinstance(batch, QueueBatch) else batch.events
        self.batches.append((False, [e.position for e in every]))

    def close(self) -> None:
        pass

    def early_ids(self) -> list[int]:
        return [i for early, ids in self.batches if early for i in ids]

    def queue_ids(self) -> list[int]:
        return [i for early, ids in self.batches if not early for i in ids]


@contextmanager
def listener_with_tap(env: Env, config: Path) -> Iterator[tuple[ListenerThread, RecordingTap]]:
    listener = ListenerThread.from_file(config)
    tap = RecordingTap()
    listener.runner._tap = tap  # the runner's own hook, as `tail` uses it
    listener.start()
    try:
        # A first change, processed: the listener is past its start and waits for NOTIFY.
        write(env, "INSERT INTO users VALUES (%s, 'warm@x')", [WARM_UP], ids=range(WARM_UP, 1000))
        wait_until(lambda: tap.batches and queue_count(env) == 0, what="the warm-up change")
        tap.batches.clear()
        yield listener, tap
    finally:
        listener.stop()


@contextmanager
def notifications(env: Env) -> Iterator[psycopg.Connection[Any]]:
    """A connection of its own LISTENing on the channels the capture functions notify:
    the wake-up's and the payloads'."""
    with env.connect() as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        conn.execute(f'LISTEN "{payload_channel(env)}"')
        yield conn


def next_payloads(conn: psycopg.Connection[Any], n: int) -> list[str]:
    """What the next `n` notifying transactions sent: each ends with the empty wake-up
    on CHANNEL, after its payload (on the payloads' channel) if it sent one: that, or ''."""
    payloads: list[str] = []
    payload = ""
    for notify in conn.notifies(timeout=10):
        if notify.channel != CHANNEL:
            payload = notify.payload
            continue
        payloads.append(payload)
        payload = ""
        if len(payloads) == n:
            break
    assert len(payloads) == n, f"{len(payloads)} notifying transactions within 10 s, not {n}"
    return payloads


def next_payload(conn: psycopg.Connection[Any]) -> str:
    [payload] = next_payloads(conn, 1)
    return payload


def until_marker(conn: psycopg.Connection[Any]) -> list[str]:
    """The payloads `conn` hears before a notification whose payload is 'marker'."""
    payloads: list[str] = []
    for notify in conn.notifies(timeout=10):
        if notify.payload == "marker":
            return payloads
        payloads.append(notify.payload)
    raise AssertionError(f"no marker within 10 s, only {payloads}")


def unlinks(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_unlink", {}).get("calls", 0))


def queue_ids(env: Env) -> list[int]:
    with env.connect() as conn:
        return [
            row[0]
            for row in conn.execute(
                "SELECT id FROM cdc_invalidator.queue_v1"
                " WHERE coalesce(new_row, old_row) ->> 'id' IS DISTINCT FROM %s ORDER BY id",
                [str(WARM_UP)],
            )
        ]


def settled(env: Env, r: redis.Redis, ids: range | list[int]) -> bool:
    return not any(r.exists(k) for i in ids for k in keys_of(i)) and queue_count(env) == 0


def test_a_one_row_update_is_deleted_from_the_payload_with_one_unlink(env: Env) -> None:
    # second_delete_ms = 0: every batch's keys are deleted again 300 ms later by default,
    # and this test counts the UNLINKs of first deletes.
    config = setup_users(
        env, notify_payload=True, rows=3, prune_every_ms=KEEP_QUEUE, second_delete_ms=0
    )
    r = env.redis()
    with listener_with_tap(env, config) as (listener, tap):
        cache(r, [2])
        r.config_resetstat()  # the warm-up's UNLINKs
        with notifications(env) as conn:
            write(env, "UPDATE users SET email = email WHERE id = 2", ids=range(2, 3))
            payload = json.loads(next_payload(conn))
        [queued] = queue_ids(env)
        assert payload["s"] == "public"
        assert payload["t"] == "users"
        assert isinstance(payload["x"], int)
        assert isinstance(payload["a"], (int, float))
        row = {"id": "2", "email": "u2@x"}
        assert payload["r"] == [["U", row, row]]
        wait_until(lambda: settled(env, r, [2]), what="user 2's keys deleted and acknowledged")
        # Its keys went in one UNLINK, from the payload; the queue read acknowledged the
        # row without deleting its keys again.
        assert tap.early_ids() == [0], tap.batches
        assert queued not in tap.queue_ids()
        assert unlinks(r) == 1
        # Counted once, by the queue read (the warm-up's change is the other).
        assert listener.runner.events_processed == 2


def test_a_payload_read_with_a_query_result_still_makes_an_early_batch(env: Env) -> None:
    """A NOTIFY that reaches the listener while it runs a query is read by psycopg with
    that query's results, not off the idle socket: it must reach the queue all the same
    (as a wake-up, and with its row for an early batch), not wait in psycopg's backlog."""
    setup_users(env, notify_payload=True, rows=3)
    pg = PgConnector(env.dsn, application_name="test-fast-path", connect_timeout_s=5)
    queue = TriggerCapture(pg, payloads=True).connect()
    try:
        write(env, "UPDATE users SET email = email WHERE id = 2", ids=range(2, 3))
        # Committed (and its NOTIFY signalled) before this query was sent: the server
        # sends the notification before this query's ReadyForQuery at the latest.
        queue._conn.execute("SELECT 1")
        with queue.batch(100) as batch:
            assert isinstance(batch, EarlyBatch), batch
            assert [(e.op, e.new) for e in batch.events] == [
                (Op.UPDATE, {"id": "2", "email": "u2@x"})
            ]
    finally:
        queue.close()


def test_one_row_inserts_and_deletes_are_deleted_early_once_each(env: Env) -> None:
    # second_delete_ms = 0: only first deletes are counted (as above).
    config = setup_users(env, notify_payload=True, rows=3, second_delete_ms=0)
    r = env.redis()
    with listener_with_tap(env, config) as (_listener, tap):
        cache(r, [1, 2, 3, 7])
        r.config_resetstat()
        with notifications(env) as conn:
            write(env, "DELETE FROM users WHERE id = 1", ids=range(1, 2))
            write(env, "INSERT INTO users VALUES (7, %s)", ["u7@x"], ids=range(7, 8))
            ops = [json.loads(p)["r"][0][0] for p in next_payloads(conn, 2)]
        assert ops == ["D", "I"]
        wait_until(lambda: settled(env, r, [1, 7]), what="users 1 and 7 deleted")
        # Each change deleted by exactly one batch: early (the queue read found it
        # before its payload was looked at only if both came in one wake-up).
        assert len(tap.early_ids()) + len(tap.queue_ids()) == 2, tap.batches
        assert tap.early_ids(), tap.batches
        assert unlinks(r) == sum(1 for _, ids in tap.batches if ids), tap.batches
        assert all(r.exists(k) for i in (2, 3) for k in keys_of(i))


def test_a_statement_of_several_rows_goes_by_the_queue_in_packs(env: Env) -> None:
    config = setup_users(env, notify_payload=True, rows=50)
    r = env.redis()
    with listener_with_tap(env, config) as (_listener, tap):
        cache(r, range(1, 51))
        with notifications(env) as conn:
            write(env, "DELETE FROM users WHERE id <= 2", ids=range(1, 3))
            assert next_payload(conn) == ""  # the plain wake-up
            write(
                env,
                "UPDATE users SET email = 'n' || email WHERE id BETWEEN 3 AND 50",
                ids=range(3, 51),
            )
            assert next_payload(conn) == ""
        wait_until(lambda: settled(env, r, range(1, 51)), what="50 users' keys deleted")
        assert tap.early_ids() == []
        assert len(tap.queue_ids()) == 50
        assert all(i < 0 for i in tap.queue_ids()), "pack positions"


def test_a_transaction_sends_one_payload_then_the_wake_up(env: Env) -> None:
    """Payloads do not fold: a transaction sends its first one-row statement's, then the
    empty wake-up (which does: one, whatever follows). The listener deletes that first
    row early and the others from the queue read."""
    config = setup_users(env, notify_payload=True, rows=5)
    r = env.redis()
    with listener_with_tap(env, config) as (_listener, tap):
        cache(r, range(1, 6))
        wait_until(lambda: listener_quiet(env), what="the listener quiet")
        with notifications(env) as conn:
            with env.connect() as writer, writer.transaction():
                for i in range(1, 6):
                    writer.execute("UPDATE users SET email = email WHERE id = %s", [i])
            env.sql("SELECT pg_notify(%s, 'marker')", [CHANNEL])
            first, wake_up = until_marker(conn)
        assert json.loads(first)["r"][0][1] == {"id": "1", "email": "u1@x"}
        assert wake_up == ""
        wait_until(lambda: settled(env, r, range(1, 6)), what="5 users' keys deleted")
        assert len(tap.early_ids()) == 1
        assert len(tap.queue_ids()) == 4  # (the first recognized: acknowledged, not deleted)


def test_redis_refusing_the_early_delete_leaves_it_to_the_queue_read(env: Env) -> None:
    config = setup_users(
        env,
        notify_payload=True,
        rows=3,
        retry_initial_ms=20,
        retry_max_ms=50,
        prune_every_ms=KEEP_QUEUE,
    )
    r = env.redis()
    with listener_with_tap(env, config) as (listener, tap):
        runner = listener.runner
        cache(r, [1])
        # A replica of a master nobody runs: keeps its keys, refuses every UNLINK.
        r.replicaof("127.0.0.1", "1")
        try:
            with notifications(env) as conn:
                write(env, "DELETE FROM users WHERE id = 1", ids=range(1, 2))
                assert json.loads(next_payload(conn))["r"][0][0] == "D"
            [queued] = queue_ids(env)
            wait_until(lambda: runner.redis.failures >= 2, what="deletes refused")
            assert all(r.exists(k) for k in keys_of(1))
            assert queue_count(env) == 1, "nothing acknowledged while Redis refuses"
        finally:
            r.replicaof("NO", "ONE")
        wait_until(lambda: settled(env, r, [1]), what="user 1's keys deleted once Redis is back")
        assert queued in tap.queue_ids(), "the queue read deleted what the early batch could not"


def test_a_payload_too_large_for_notify_falls_back_to_the_wakeup(env: Env) -> None:
    config = setup_users(env, notify_payload=True)
    r = env.redis()
    long_email = "x" * 9000
    r.set(f"user:email:{long_email}", "stale")
    with listener_with_tap(env, config) as (_listener, tap):
        with notifications(env) as conn:
            write(env, "INSERT INTO users VALUES (7, %s)", [long_email], ids=range(7, 8))
            assert next_payload(conn) == ""
        wait_until(
            lambda: r.exists(f"user:email:{long_email}") == 0 and queue_count(env) == 0,
            what="the long key deleted",
        )
        assert tap.early_ids() == []
        assert len(tap.queue_ids()) == 1


def test_a_payload_another_backend_sent_never_stands_for_the_writers_row(env: Env) -> None:
    """A watched table's owner may send payloads (its capture functions do, through
    notify_row_v1()). A payload naming a transaction still open (its xid is in pg_locks)
    and its row has that row's keys deleted before the commit, when a reader may cache
    the old row again: the writer's row must still be deleted when the
    queue read gets it, since the payload did not come from the writer's backend. (The
    writer's own payload is not sent here, as when it is dropped; with it, its delete
    after the commit would hide the loss.)"""
    config = setup_users(env, notify_payload=True, rows=4, second_delete_ms=0)
    r = env.redis()
    with listener_with_tap(env, config) as (_listener, tap), env.connect() as writer:
        cache(r, [4])
        xid = update_without_notify(writer, 4)
        env.sql(NOTIFY_ROW, [forged_payload(xid, 4)])
        wait_until(tap.early_ids, what="the forged payload's early delete")
        assert not any(r.exists(k) for k in keys_of(4))
        cache(r, [4])  # a reader refills the cache from the row as it was
        writer.execute("COMMIT")
        wait_until(lambda: settled(env, r, [4]), what="the writer's row deleted, once visible")


@pytest.mark.parametrize("notify_payload", [False, True], ids=["payload-off", "payload-on"])
def test_a_payload_on_the_wake_up_channel_deletes_nothing(env: Env, notify_payload: bool) -> None:
    """Any role that can connect may NOTIFY on the wake-up's channel, with a payload,
    which the listener once deleted early (a review deleted a table's keys on demand).
    It only wakes it: payloads count from their own channel, with notify_payload on;
    off, the queue is all the listener deletes from."""
    config = setup_users(env, rows=4, second_delete_ms=0, notify_payload=notify_payload)
    r = env.redis()
    with listener_with_tap(env, config) as (_listener, tap):
        cache(r, [3, 4])
        xid = env.scalar("SELECT txid_current()")  # committed
        env.sql("SELECT pg_notify(%s, %s)", [CHANNEL, forged_payload(xid, 4)])
        write(env, "UPDATE users SET email = email WHERE id = 3", ids=range(3, 4))
        wait_until(lambda: settled(env, r, [3]), what="the real change's keys deleted")
        # (the real change's, with the payload on: its own, on the payloads' channel)
        assert len(tap.early_ids()) == (1 if notify_payload else 0)
        assert all(r.exists(k) for k in keys_of(4))


def test_a_rolled_back_transaction_deletes_nothing(env: Env) -> None:
    config = setup_users(env, notify_payload=True, rows=3, prune_every_ms=KEEP_QUEUE)
    r = env.redis()
    with listener_with_tap(env, config) as (_listener, tap):
        cache(r, [1, 2])
        with env.connect() as conn, conn.transaction(force_rollback=True):
            conn.execute("UPDATE users SET email = 'gone' WHERE id = 1")
        # A later commit, delivered: everything before it was looked at.
        insert_users(env, 10, 1)
        wait_until(lambda: settled(env, r, [10]), what="the later insert processed")
        assert all(r.exists(k) for k in keys_of(1))
        assert all(r.exists(k) for k in keys_of(2))
        # Only the insert's row went by, early.
        assert len(tap.early_ids()) == 1, tap.batches
        assert tap.queue_ids() == []


def test_a_judged_update_sends_only_what_it_queues(env: Env) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, logins int)")
    env.sql("INSERT INTO users VALUES (1, 'u1@x', 0)")
    config = env.config({"public.users": ["user:{id}", "user:email:{email}"]}, notify_payload=True)
    header = '[tables."public.users"]\n'
    config.write_text(config.read_text().replace(header, header + 'ignore_columns = ["logins"]\n'))
    assert main(["install", "--config", str(config)]) == 0
    with notifications(env) as conn:
        env.sql("UPDATE users SET logins = 1 WHERE id = 1")  # judged unchanged: nothing
        env.sql("UPDATE users SET email = 'new@x' WHERE id = 1")
        # The first notification is the second UPDATE's.
        payload = json.loads(next_payload(conn))
    assert payload["r"] == [["U", {"id": "1", "email": "u1@x"}, {"id": "1", "email": "new@x"}]]
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 1


def capture_function(env: Env) -> str:
    """The text of users' capture function."""
    text = env.scalar(
        "SELECT prosrc FROM pg_proc WHERE oid ="
        " format('cdc_invalidator.%I()', 'capture_' || 'users'::regclass::oid || '_v1')"
        "::regprocedure"
    )
    assert isinstance(text, str)
    return text


def test_only_the_installing_role_hears_payloads_and_install_switches_them(env: Env) -> None:
    """A plain role that LISTENs (it needs no privilege for that) on the wake-up's channel
    hears only empty wake-ups, the payload on or off, and may neither read the payloads'
    channel nor LISTEN on it through the listener's function; the installing role hears
    the row there. Off by default; `install` with notify_payload = true compiles the
    payload in, and `install` without it takes it out again."""
    config = setup_users(env, rows=3)
    role = "plain_" + uuid.uuid4().hex[:8]  # no grant of any kind
    env.sql(f"CREATE ROLE {role} LOGIN")
    updates = iter(range(100))

    def heard() -> tuple[list[str], list[str]]:
        """What the plain role and the installing role (on both channels) hear of one
        one-row UPDATE, until a marker sent after it."""
        with (
            psycopg.connect(make_conninfo(env.dsn, user=role), autocommit=True) as plain,
            notifications(env) as installer,
        ):
            plain.execute(f"LISTEN {CHANNEL}")
            env.sql(f"UPDATE users SET email = 'n{next(updates)}@x' WHERE id = 2")
            env.sql("SELECT pg_notify(%s, 'marker')", [CHANNEL])
            return until_marker(plain), until_marker(installer)

    try:
        assert heard() == ([""], [""])
        assert "notify_row_v1" not in capture_function(env)

        payload_on = config.read_text().replace("[tables.", "notify_payload = true\n[tables.", 1)
        config.write_text(payload_on)
        assert main(["install", "--config", str(config)]) == 0
        assert "notify_row_v1" in capture_function(env)
        plain, [installer, wake_up] = heard()
        assert plain == [""]  # the wake-up that goes with the payload (on its own channel)
        assert wake_up == ""
        payload = json.loads(installer)
        assert payload["r"][0][0] == "U"
        assert payload["r"][0][2] == {"id": "2", "email": "n1@x"}
        with psycopg.connect(make_conninfo(env.dsn, user=role), autocommit=True) as conn:
            for statement in (
                "SELECT channel FROM cdc_invalidator.payload_channel_v1",
                "SELECT cdc_invalidator.listen_v1()",
                "SELECT cdc_invalidator.notify_row_v1('{}')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)

        config.write_text(payload_on.replace("notify_payload = true\n", ""))
        assert main(["install", "--config", str(config)]) == 0
        assert "notify_row_v1" not in capture_function(env)
        assert heard() == ([""], [""])
    finally:
        env.sql(f"DROP ROLE {role}")


# Migrations under the payload (docs/DBA.md, "Schema migrations" says what each must
# do): the DDL, run while the listener runs (None: none), then a write that succeeds;
# the keys that must go; whether its row still rides in the payload (deleted early). A
# renamed or dropped key column takes the capture function's drifted path, which sends
# the wake-up: the queue read deletes (a dropped one sweeps every key of the templates).
NEW = "user:email:new@x"
EVERY_USER = {NEW, *(k for i in (1, 2, 3) for k in keys_of(i))}
MIGRATIONS = [
    pytest.param(
        "ALTER TABLE users RENAME COLUMN email TO mail",
        "UPDATE users SET mail = 'new@x' WHERE id = 1",
        {*keys_of(1), NEW},
        False,
        id="renamed-key-column",
    ),
    pytest.param(
        # (a rewrite of the table: the rebuild guard sweeps it, a cold cache for a retype
        # whose text is the same)
        "ALTER TABLE users ALTER COLUMN id TYPE bigint",
        "UPDATE users SET email = 'new@x' WHERE id = 1",
        EVERY_USER,
        True,
        id="id-retyped-bigint",
    ),
    pytest.param(
        None,
        "SET session_replication_role = replica; UPDATE users SET email = 'new@x' WHERE id = 1",
        {*keys_of(1), NEW},
        True,
        id="replica-role-write",
    ),
    pytest.param(
        "ALTER TABLE users DROP COLUMN email",
        "DELETE FROM users WHERE id = 2",
        EVERY_USER,
        False,
        id="dropped-key-column-delete",
    ),
    pytest.param(
        "ALTER TABLE users RENAME TO members",
        "DELETE FROM members WHERE id = 2",
        set(keys_of(2)),
        True,
        id="renamed-table-delete",
    ),
]


@pytest.mark.parametrize(("ddl", "statement", "gone", "early"), MIGRATIONS)
def test_migrations_under_the_payload_keep_writes_and_deletes(
    env: Env, ddl: str | None, statement: str, gone: set[str], early: bool
) -> None:
    # second_delete_ms = 0: a key deleted 300 ms later by the second delete would hide an
    # early delete that was lost (its queue row acknowledged without deleting again).
    config = setup_users(env, notify_payload=True, rows=3, second_delete_ms=0)
    r = env.redis()
    with listener_with_tap(env, config) as (_listener, tap):
        cache(r, [1, 2, 3])
        r.mset({NEW: "stale", "other:1": "no template reaches it"})
        if ddl is not None:
            env.sql(ddl)
            # Whatever the DDL queued (a rewrite's sweep) done, and the listener quiet
            # again: else the write may find it busy and send no payload (a loaded run's
            # id-retyped-bigint was not deleted early).
            wait_until(
                lambda: queue_count(env) == 0 and listener_quiet(env),
                what="the listener quiet after the DDL",
            )
        env.sql(statement)
        wait_until(
            lambda: not any(r.exists(k) for k in gone) and queue_count(env) == 0,
            what="the write's keys deleted and acknowledged",
        )
        # Deleted early (not only handed out early, then left to the queue read), or not.
        assert bool(tap.early_ids()) == early, tap.batches
    assert keys(r) == (EVERY_USER - gone) | {"other:1"}
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def change(op: Op, i: int) -> ChangeEvent:
    return ChangeEvent(TableName("public", "users"), op, {"id": str(i)}, {"id": str(i)}, i)


def test_early_changes_are_skipped_once_each_by_transaction_writer_and_content() -> None:
    early = EarlyChanges()
    one, two = change(Op.UPDATE, 1), change(Op.UPDATE, 2)
    early.add([((700, 42), c) for c in (content(one), content(one)) if c is not None])
    # Queue rows: three alike in transaction 700 by backend 42 (two deleted early), one
    # in 701, one of different content, and one alike whose writer was another backend
    # or sent no payload (pid NULL): the payload that claimed it came from elsewhere.
    rows = [change(Op.UPDATE, 1)._replace(position=p) for p in (10, 11, 12, 13, 15, 16)]
    rows.append(two._replace(position=14))
    senders: dict[int, Sender] = {
        10: (700, 42), 11: (700, 42), 12: (700, 42), 13: (701, 42), 14: (700, 42),
        15: (700, 43), 16: (700, None),
    }  # fmt: skip
    kept, skipped = early.split(rows, senders)
    assert [e.position for e in kept] == [12, 13, 15, 16, 14]
    assert len(skipped) == 2
    # Not acknowledged: the same read skips the same again.
    assert early.split(rows, senders)[1] == skipped
    early.forget(skipped)
    assert not early


def test_early_changes_a_later_snapshot_saw_still_open_are_forgotten() -> None:
    """A payload is delivered once its transaction is visible: one remembered before a
    snapshot that saw its transaction open was sent in its name (a prepared
    transaction's backend), and is forgotten. Only a snapshot taken after is a judge."""
    early = EarlyChanges()
    found = content(change(Op.UPDATE, 1))
    assert found is not None
    early.add([((700, 42), found), ((702, 42), found), ((699, 43), found)])
    after = time.monotonic() + 1
    # 700 still open, 699 complete, 702 begun after the snapshot: not seen complete.
    assert early.drop_uncommitted("699:702:700", taken_after=time.monotonic() - 60) == []
    assert sorted(early.drop_uncommitted("699:702:700", taken_after=after)) == [
        (700, 42),
        (702, 42),
    ]
    rows = [change(Op.UPDATE, 1)._replace(position=p) for p in (1, 2, 3)]
    senders: dict[int, Sender] = {1: (700, 42), 2: (702, 42), 3: (699, 43)}
    kept, skipped = early.split(rows, senders)
    assert [e.position for e in kept] == [1, 2]
    assert skipped == [((699, 43), found)]


def test_early_changes_are_bounded_in_number_and_time() -> None:
    found = content(change(Op.DELETE, 1))
    assert found is not None
    early = EarlyChanges(keep_s=3600, most=2)
    early.add([((1, 9), found), ((2, 9), found), ((3, 9), found)])
    rows = [change(Op.DELETE, 1)._replace(position=p) for p in (1, 2, 3)]
    kept, _ = early.split(rows, {1: (1, 9), 2: (2, 9), 3: (3, 9)})
    assert [e.position for e in kept] == [1]  # made room
    expiring = EarlyChanges(keep_s=0)
    expiring.add([((1, 9), found)])
    assert not expiring


def test_a_value_that_cannot_be_compared_is_never_recognized() -> None:
    # A queue row written by hand can hold any JSON value where a key column's text goes.
    event = ChangeEvent(TableName("public", "users"), Op.INSERT, None, {"id": cast(str, ["1"])}, 1)
    assert content(event) is None


def test_an_early_batch_knows_only_what_was_not_left() -> None:
    events = [change(Op.UPDATE, i)._replace(position=i) for i in range(3)]
    batch = EarlyBatch(events, [5, 5, 6], [40, 40, 41], [None, None, None])
    batch.dead_letter(1, "refused")
    assert [sender for sender, _ in batch.deleted()] == [(5, 40), (6, 41)]
    assert batch.dead == {}, "a refused change is the queue read's to dead-letter"
    batch.leave()
    assert list(batch.deleted()) == []


def test_a_snapshot_sees_what_completed_before_it() -> None:
    snap = "100:105:100,103"
    assert visible_in(snap, 99)
    assert not visible_in(snap, 100)
    assert visible_in(snap, 101)
    assert not visible_in(snap, 103)
    assert not visible_in(snap, 105)
    assert not visible_in("1:1:", 728)


# --- the runner's hand-off, against in-memory fakes ------------------------------------


class OneBatch:
    """A Source that hands out one batch."""

    def __init__(self, batch: EarlyBatch) -> None:
        self.handed = batch

    @contextmanager
    def _batch(self) -> Iterator[EarlyBatch]:
        yield self.handed

    def batch(self, limit: int) -> AbstractContextManager[Batch]:
        return self._batch()

    def maintain(self) -> None:
        pass

    def wait(self, timeout_s: float, wakeup_fd: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def payload(op: str, old: dict[str, str] | None, new: dict[str, str] | None) -> str:
    return json.dumps({"s": "public", "t": "users", "x": 900, "a": 1.5, "r": [[op, old, new]]})


def handed_to_a_runner(payloads: list[str]) -> tuple[EarlyBatch, RecordingSink, Runner]:
    batch = early_batch(RowDecoder(), [(77, p) for p in payloads], "800:800:", limit=100)
    sink = RecordingSink()
    stopper = Stopper()
    try:
        runner = Runner(
            connect=lambda: cast(Source, None),
            mapper=Mapper({TableName("public", "users"): [KeyTemplate.parse("user:{id}")]}),
            sink=sink,
            config=RunnerConfig(),
            stopper=stopper,
        )
        assert runner._process_batch(cast(Source, OneBatch(batch))) == batch.size
    finally:
        stopper.close()
    return batch, sink, runner


def test_an_early_batch_deletes_and_counts_only_its_keys() -> None:
    batch, sink, runner = handed_to_a_runner(
        [payload("U", {"id": "1"}, {"id": "2"}), payload("D", {"id": "3"}, None)]
    )
    assert sink.deletes == [["user:1", "user:2", "user:3"]]
    assert [sender for sender, _ in batch.deleted()] == [(900, 77), (900, 77)]
    assert runner.keys_deleted == 3
    assert runner.events_processed == 0, "counted by the queue read that acknowledges"


def test_an_early_batch_needing_a_sweep_is_left_whole_to_the_queue_read() -> None:
    # A payload written by hand: a TRUNCATE (the capture functions never send one) is a
    # sweep, which only a batch that acknowledges may hold.
    batch, sink, runner = handed_to_a_runner(
        [payload("U", {"id": "1"}, {"id": "1"}), payload("T", None, None)]
    )
    assert sink.deletes == []
    assert list(batch.deleted()) == []
    assert runner.keys_deleted == 0


def test_payloads_that_cannot_be_read_or_were_read_already_make_no_early_batch() -> None:
    decoder = RowDecoder()
    broken = ["{", "[1]", json.dumps({"s": "public"}), payload("X", None, None)]
    assert early_batch(decoder, [(1, b) for b in broken], "800:800:", limit=100).events == []
    seen = (1, payload("I", None, {"id": "1"}))  # transaction 900, complete in 901:901:
    assert early_batch(decoder, [seen], "901:901:", limit=100).events == []
    assert len(early_batch(decoder, [seen, seen], "800:800:", limit=1).events) == 1
