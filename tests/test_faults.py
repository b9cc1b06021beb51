"""Faults on real processes: whatever goes down, every committed change's keys end up deleted.

Every test runs in both capture modes (the `capture` fixture). Each breaks one thing for
real (SIGKILL, a stopped or read-only Redis, a restarted PostgreSQL, a terminated
backend, SIGTERM/SIGINT) and checks the at-least-once guarantee two ways: at the moment
of the fault, nothing has been acknowledged while its keys are still in Redis (an event
is acknowledged only after Redis deleted its keys); and after healing, every key is gone
and everything is acknowledged.

Acknowledged means, in trigger mode, that the event left the queue (the listener's saved
progress passed it). In logical mode it means that the replication slot's confirmed
position (`confirmed_flush_lsn`, what the listener told the slot it has finished) passed
the transaction's commit. The tests take the WAL position after a transaction's last
change and after its commit (Written). The listener confirms the end of a transaction it
finished, or a position between transactions, never one between a transaction's last
change and the end of its commit record: past the first position means the transaction
is acknowledged, and while its keys are still cached the slot must stay below the second.

Deterministic without sleeps: a listener is held in the middle of a batch with
`CLIENT PAUSE WRITE` (its UNLINKs block, so it cannot have acknowledged that batch yet);
failures and retries are observed through PostgreSQL (`pg_stat_activity`,
`pg_replication_slots`, the server log), through Redis (`CLIENT LIST`, connections to its
port while it is down) and through the listener's own JSON log lines.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
import redis

from cdc_invalidator.capture.trigger_queue import SAVE_EVERY_S
from cdc_invalidator.mapping.mapper import Routed
from cdc_invalidator.settings import Settings
from tests.support.config import RETRY_INITIAL_MS, RETRY_MAX_MS
from tests.support.env import Env, pg_of, redis_of
from tests.support.faults import (
    APP_NAME,
    PENDING,
    SLOT,
    Written,
    acknowledged,
    blocked_on_redis,
    cache,
    insert_users,
    insert_users_one_by_one,
    keys_of,
    lsn_before,
    queue_count,
    resumes_at,
    setup_users,
    write,
)
from tests.support.listener import (
    ListenerProcess,
    ListenerThread,
    Spawn,
    exited_cleanly,
    listening,
    stop_listener,
)
from tests.support.servers import PostgresServer, RedisServer, free_port
from tests.support.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.servers, pytest.mark.usefixtures("capture")]

KEY_ID = re.compile(r"^user:(?:email:u)?(\d+)(?:@x)?$")
# A poll so slow that no test waits for it: what must happen promptly has to come from a
# NOTIFY (re-LISTEN after a reconnect) or the stream, or from the batch taken on
# (re)connecting.
NO_POLL_MS = 600_000
# Long enough for any test here; a failed test's Redis unpauses by itself.
PAUSE_MS = 20_000


# --- the world: one table, two key templates ----------------------------------------------


def insert_for_a_drain(env: Env, n: int, *, one_by_one: bool = False) -> list[Written]:
    """n rows to drain. Trigger mode: one transaction (the queue is read and acknowledged
    in batches within it), of one statement (packs of a thousand rows), or `one_by_one`
    (a queue row each, so that batch_size holds). Logical mode: ten, since the slot is
    only ever confirmed at the end of a transaction: a fault then lands between
    acknowledged transactions and unacknowledged ones, and the tests can tell which come
    again."""
    if not env.logical:
        insert = insert_users_one_by_one if one_by_one else insert_users
        return [insert(env, 1, n)]
    step = n // 10
    return [insert_users(env, first, step) for first in range(1, n + 1, step)]


# --- acknowledged or not --------------------------------------------------------------


def queued_ids(env: Env) -> set[int]:
    """Trigger mode: the user ids of the events not acknowledged yet."""
    with env.connect() as conn:
        return {row[1] for row in conn.execute(PENDING.encode())}


def cached_ids(r: redis.Redis) -> set[int]:
    ids = set()
    for key in r.scan_iter("user:*", count=10_000):
        match = KEY_ID.match(key.decode() if isinstance(key, bytes) else str(key))
        assert match, f"unexpected key {key!r}"
        ids.add(int(match.group(1)))
    return ids


def pending(env: Env, r: redis.Redis) -> int:
    """Events not done yet: in trigger mode those not acknowledged (the queue); in logical
    mode the rows whose keys are still cached (a slot in use cannot be read from SQL, and
    it is acknowledged per transaction only)."""
    return len(cached_ids(r)) if env.logical else queue_count(env)


def progressed(env: Env, r: redis.Redis, writes: Sequence[Written]) -> bool:
    """Trigger mode: some events are acknowledged (and their progress saved). Logical
    mode: at least the first transaction's rows are done (every row has two keys,
    deleted in order). Both cheap to ask: the queue's pending rows, all read, took so
    long on a loaded machine that the drain was sometimes over before they said so."""
    if env.logical:
        n = sum(len(w.ids) for w in writes)
        return r.dbsize() <= 2 * (n - len(writes[0].ids))
    return bool(env.scalar("SELECT events_processed > 0 FROM cdc_invalidator.listener_state_v1"))


def none_acknowledged(env: Env, n: int, written: Written) -> bool:
    """None of the n events of the transaction `written` is acknowledged."""
    if env.logical:
        return lsn_before(resumes_at(env), written.committed)
    return queue_count(env) == n


def assert_nothing_lost(env: Env, r: redis.Redis, writes: Sequence[Written]) -> None:
    """Nothing was acknowledged while one of its keys is still cached.

    The acknowledgement is read first: a key still cached afterwards was not deleted by
    then, so (acknowledging only after Redis) its event cannot have been acknowledged by
    then. Trigger mode: no event left the queue with a key still cached. Logical mode:
    neither the slot nor the position saved is past the commit of a transaction (of
    `writes`, which wrote every cached row) one of whose rows' keys is still cached.
    """
    if env.logical:
        confirmed = resumes_at(env)
        cached = cached_ids(r)
        cached_in = [w for w in writes if not cached.isdisjoint(w.ids)]
        early = [w for w in cached_in if not lsn_before(confirmed, w.committed)]
        assert not early, (
            f"acknowledged up to {confirmed}, past the commit of {len(early)} transactions "
            f"whose rows' keys are still cached (rows {early[0].ids.start}.. before "
            f"{early[0].committed})"
        )
        return
    queued = queued_ids(env)
    lost = sorted(cached_ids(r) - queued)
    assert not lost, f"{len(lost)} events acknowledged with their keys still cached: {lost[:10]}"


def slot_released(env: Env) -> bool:
    """Logical mode: no process streams the slot (its confirmed position is final)."""
    return bool(
        env.scalar(
            "SELECT active_pid IS NULL FROM pg_replication_slots WHERE slot_name = %s", [SLOT]
        )
    )


def unacknowledged_rows(env: Env, writes: Sequence[Written]) -> int:
    """Logical mode: the rows of the transactions not acknowledged (what the next
    listener is streamed again)."""
    confirmed = resumes_at(env)
    rows = 0
    for w in writes:
        if lsn_before(w.last_change, confirmed):
            # Between the transaction's last change and its commit's end there is no
            # position the listener confirms (other sessions wrote nothing meanwhile).
            assert not lsn_before(confirmed, w.committed), (confirmed, w)
        else:
            rows += len(w.ids)
    return rows


def drained(env: Env, r: redis.Redis, written: Written) -> bool:
    """Every key deleted, and every event up to the transaction `written` acknowledged."""
    return r.dbsize() == 0 and acknowledged(env, written)


# --- the listener, seen from PostgreSQL and Redis ------------------------------------------


def listener_backend(env: Env) -> tuple[int, str] | None:
    """The listener's session (pid, state), if it is connected: in logical mode the
    walsender streaming the slot (the listener keeps an ordinary session beside it, for
    the slot's state and dead letters, under the same application_name)."""
    with env.connect() as conn:
        row = conn.execute(
            "SELECT pid, state FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()"
            " AND backend_type = %s",
            [APP_NAME, "walsender" if env.logical else "client backend"],
        ).fetchone()
    return None if row is None else (row[0], row[1])


def listener_sessions(env: Env) -> int:
    """How many sessions the listener has open, of any kind."""
    return int(
        env.scalar(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            [APP_NAME],
        )
    )


# --- counting tries while Redis is down ------------------------------------------------------

FETCH_MARK = "The next events to invalidate"  # the first line of sql/fetch_batch.sql


def log_statements(env: Env) -> None:
    """Have the server log every statement, so that the listener's tries can be counted."""
    env.sql("ALTER SYSTEM SET log_statement = 'all'")
    env.sql("SELECT pg_reload_conf()")


class HangUp:
    """Answers a stopped server's port and hangs up on every connection, counting them."""

    def __init__(self, port: int) -> None:
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hang-up", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            conn.close()
            self.connections += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


class Tries:
    """How many times the listener tried Redis while it is down (start it once Redis is
    stopped, close it before Redis starts again).

    Every try connects to Redis first (asking who it is, before any batch: a restarted
    Redis may need a replay): its port is answered by a HangUp, which counts
    connections.
    """

    # Connections per try to a port that hangs up: the connect and its one retry.
    CONNECTIONS_PER_TRY = 2

    def __init__(self, env: Env) -> None:
        self._hang_up = HangUp(redis_of(env).port)

    def __call__(self) -> int:
        return -(-self._hang_up.connections // self.CONNECTIONS_PER_TRY)

    def close(self) -> None:
        self._hang_up.close()


def most_attempts(elapsed_s: float) -> int:
    """The most retries that exponential back-off (FAST settings, -10 % jitter) allows."""
    base, spent, attempts = RETRY_INITIAL_MS / 1000, 0.0, 1
    while True:
        spent += base * 0.9
        if spent > elapsed_s:
            return attempts
        attempts += 1
        base = min(base * 2, RETRY_MAX_MS / 1000)


def count(listener: ListenerProcess, event: str) -> int:
    return len(listener.logged(event))


# --- SIGKILL mid-stream -------------------------------------------------------------------


def frozen_mid_drain(
    own_env: Env, spawn: Spawn, r: redis.Redis, n: int
) -> tuple[ListenerProcess, Path, list[Written]]:
    """A listener draining n changes, caught in the middle: some batches done, its next
    UNLINKs held by CLIENT PAUSE WRITE. The caller unpauses Redis."""
    # Small batches, of single rows: the drain takes long enough to be caught in the
    # middle (packs of a thousand rows drained in a few dozen batches, sometimes all of
    # them before Redis was paused).
    config = setup_users(own_env, batch_size=20)
    writes = insert_for_a_drain(own_env, n, one_by_one=True)
    cache(r, range(1, n + 1))
    listener = spawn(config)
    wait_until(lambda: progressed(own_env, r, writes), what="the listener to make progress")
    r.client_pause(PAUSE_MS, all=False)
    wait_until(lambda: blocked_on_redis(r), what="the listener blocked on UNLINK")
    return listener, config, writes


def redelivered(env: Env, writes: Sequence[Written], left: int) -> int:
    """What the next listener processes after this one died or stopped: trigger mode,
    the `left` events not acknowledged; logical mode, every row of the transactions the
    slot is not confirmed past (once the dead listener's walsender has let go of it)."""
    if not env.logical:
        return left
    wait_until(lambda: slot_released(env), what="the slot released")
    rows = unacknowledged_rows(env, writes)
    assert left <= rows, "rows still cached must all come again"
    return rows


def test_sigkill_mid_batch_redelivers_everything(own_env: Env, spawn: Spawn) -> None:
    n = 30_000
    r = own_env.redis()
    try:
        # Frozen mid-stream: its next UNLINKs block before it may acknowledge them.
        first, config, writes = frozen_mid_drain(own_env, spawn, r, n)
        first.kill()  # SIGKILL: no handler, no rollback from the client side
        assert first.process is not None
        assert first.process.returncode == -signal.SIGKILL
    finally:
        r.client_unpause()

    left = pending(own_env, r)
    assert 0 < left < n, "the kill was meant to land mid-stream"
    assert r.dbsize() > 0, "some keys must still be cached when the listener dies"
    assert_nothing_lost(own_env, r, writes)
    again = redelivered(own_env, writes, left)

    second = spawn(config)
    wait_until(lambda: drained(own_env, r, writes[-1]), timeout_s=30, what="every key deleted")
    # The second listener re-did what was not acknowledged: the killed batch and those
    # after it (logical mode: from the start of the killed batch's transaction).
    assert stop_listener(second)["events"] == again


# --- Redis down for a while, and back -----------------------------------------------------


def test_redis_down_events_wait_then_drain(own_env: Env, spawn: Spawn) -> None:
    n = 200
    # No idle polling: every statement the listener runs meanwhile is a try (trigger mode).
    config = setup_users(own_env, rows=n, poll_interval_ms=NO_POLL_MS)
    r = own_env.redis()
    listener = spawn(config)
    # It knows this Redis before it goes: the one that comes back is another (a restart).
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")

    # The app's cache, persisted: Redis comes back from this dump with the stale values
    # already loaded (setting them after the restart would race the listener's retry).
    cache(r, range(1, n + 1))
    r.save()
    redis_of(own_env).stop()
    tries = Tries(own_env)
    measured_at = time.monotonic()

    try:
        # n events, committed
        written = write(own_env, "UPDATE users SET email = 'new-' || email", ids=range(1, n + 1))
        wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
        # Let several back-off rounds go by: each failed try takes its batch again (or,
        # logical mode, keeps it and connects to Redis again).
        wait_until(lambda: tries() >= 5, what="retries", timeout_s=20)
        retries = tries()
        elapsed_s = time.monotonic() - measured_at
    finally:
        tries.close()

    assert none_acknowledged(own_env, n, written), "events wait while Redis is down"
    assert count(listener, "redis_unavailable") == 1, "one line per state change, not per retry"
    assert count(listener, "redis_available") == 0
    # Backed off, not a hot loop: no more tries than the exponential delays leave room for
    # (plus the one the UPDATE started).
    assert retries <= most_attempts(elapsed_s) + 1, (retries, elapsed_s)

    redis_of(own_env).start()  # same port, loads the dump
    wait_until(lambda: drained(own_env, r, written), what="stale keys deleted once Redis is back")
    wait_until(lambda: listener.logged("redis_available"), what="redis_available")
    assert count(listener, "redis_unavailable") == 1
    assert count(listener, "redis_available") == 1
    stopped = stop_listener(listener)
    # Every stale key came back with the dump and was deleted by this listener: by the
    # replay a new Redis gets (trigger mode: it reads the queue, with these events in
    # it), or by the batches.
    replayed = sum(line["existed"] for line in listener.logged("replay_done"))
    assert len(listener.logged("redis_changed")) == 1
    assert stopped["keys_deleted"] + replayed == 2 * n
    assert stopped["events"] == n


@pytest.mark.parametrize("capture", ["trigger"], ids=["trigger"])  # logical: no NOTIFY
def test_redis_down_the_listener_still_reads_its_notifications(own_env: Env) -> None:
    """Trigger mode: during a Redis outage the loop runs no query, and notifications
    keep coming. Left unread, they fill the socket and block the listener's backend as it
    sends them, which holds the server's NOTIFY queue for every session (once full,
    every write to a watched table fails at commit): they are read all the same."""
    config = setup_users(own_env, rows=1)
    r = own_env.redis()
    with listening(config) as listener:
        wait_until(lambda: listener.runner.postgres.available, what="the listener connected")
        redis_of(own_env).stop()
        try:
            written = write(own_env, "UPDATE users SET email = 'new-' || email", ids=range(1, 2))
            wait_until(lambda: listener.runner.redis.available is False, what="the outage")
            # About 100 MB (the socket's buffers hold some MB), in one transaction.
            with own_env.connect() as conn, conn.transaction():
                conn.execute(
                    "SELECT pg_notify('cdc_invalidator_v1', i || repeat('x', 7900))"
                    " FROM generate_series(1, 12000) i"
                )
            wait_until(
                lambda: backend_waits_on(own_env) == "ClientWrite",
                what="the listener's backend blocked sending them",
            )
            wait_until(
                lambda: backend_waits_on(own_env) == "ClientRead",
                timeout_s=60,
                what="every notification read: the backend idle again",
            )
            assert none_acknowledged(own_env, 1, written)
        finally:
            redis_of(own_env).start()
        wait_until(lambda: drained(own_env, r, written), what="the change done once Redis is back")


def backend_waits_on(env: Env) -> str | None:
    """What the listener's session waits on (pg_stat_activity.wait_event)."""
    return cast(
        "str | None",
        env.scalar(
            "SELECT wait_event FROM pg_stat_activity"
            " WHERE application_name = %s AND backend_type = 'client backend'",
            [APP_NAME],
        ),
    )


@pytest.mark.usefixtures("capture")
def test_a_killed_redis_connection_costs_one_retry_not_an_outage(env: Env, spawn: Spawn) -> None:
    """The loop keeps its Redis connection from batch to batch. Killed under it (a
    proxy's idle timeout, CLIENT KILL, a failed-over load balancer), the next batch's
    UNLINKs fail on it once and go through on a new one: no outage, nothing held."""
    config = setup_users(env, rows=2)
    r = env.redis()
    listener = spawn(config)
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    cache(r, [1])
    env.sql("UPDATE users SET email = 'new-' || email WHERE id = 1")
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the first change's keys deleted")

    killed = r.client_kill_filter(_type="normal", skipme=True)
    assert isinstance(killed, int)
    assert killed >= 1  # the listener's connections, the kept one among them

    cache(r, [2])
    env.sql("UPDATE users SET email = 'new-' || email WHERE id = 2")
    wait_until(lambda: r.exists(*keys_of(2)) == 0, what="the next change's keys deleted")
    assert not listener.logged("redis_unavailable")
    stopped = stop_listener(listener)
    assert stopped["events"] == 2


def test_redis_down_when_listener_starts(own_env: Env, spawn: Spawn) -> None:
    n = 100
    config = setup_users(own_env)
    r = own_env.redis()
    cache(r, range(1, n + 1))
    r.save()
    redis_of(own_env).stop()
    written = insert_users(own_env, 1, n)

    tries = Tries(own_env)
    try:
        listener = spawn(config)
        wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
        wait_until(lambda: tries() >= 3, what="retries", timeout_s=20)
    finally:
        tries.close()
    assert none_acknowledged(own_env, n, written)
    assert count(listener, "redis_unavailable") == 1

    redis_of(own_env).start()
    wait_until(lambda: drained(own_env, r, written), what="keys deleted once Redis is up")
    wait_until(lambda: listener.logged("redis_available"), what="redis_available")
    assert count(listener, "redis_unavailable") == 1
    assert count(listener, "redis_available") == 1
    assert stop_listener(listener)["keys_deleted"] == 2 * n


# --- an event is acknowledged only after Redis deleted its keys ---------------------------


def test_redis_refusing_writes_mid_drain_acknowledges_nothing(
    own_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Trigger mode drains one statement's packs (a thousand rows each) fast: enough of
    # them that Redis fails while most are still queued.
    n = 20_000 if own_env.logical else 100_000
    config = setup_users(own_env, batch_size=500)
    r = own_env.redis()
    writes = insert_for_a_drain(own_env, n)
    cache(r, range(1, n + 1))

    listener = ListenerThread.from_file(config)
    runner = listener.runner
    # Once the listener made progress, its next delete waits until Redis refuses writes:
    # Redis fails with most of the drain still to do, however fast the drain goes (a
    # loaded run's listener had deleted every key before the test made Redis refuse).
    hold, held_up, go_on = threading.Event(), threading.Event(), threading.Event()
    delete_routed = listener.sink.delete_routed

    def gated(works: Routed, later: bool = False) -> int:
        if hold.is_set() and not go_on.is_set():
            held_up.set()
            go_on.wait(30)
        return delete_routed(works, later)

    monkeypatch.setattr(listener.sink, "delete_routed", gated)
    listener.start()
    try:
        wait_until(lambda: progressed(own_env, r, writes), what="the listener to make progress")
        hold.set()
        wait_until(held_up.is_set, what="the listener's next delete waiting")
        # A replica of a master that does not exist: keeps its data, answers every
        # UNLINK with READONLY. Redis fails in the middle of a batch, deterministically.
        r.replicaof("127.0.0.1", str(free_port()))
        go_on.set()
        wait_until(lambda: runner.redis.failures >= 1, what="a batch failing on Redis")
        failing_since = time.monotonic()
        # What was acknowledged before Redis failed is saved within SAVE_EVERY_S (the
        # loop keeps saving during the outage): only then is the saved position `held`.
        wait_until(
            lambda: (
                runner.redis.failures >= 3 and time.monotonic() - failing_since > 2 * SAVE_EVERY_S
            ),
            what="batches failing on Redis, the progress before them saved",
        )
        assert runner.redis.available is False
        held = pending(own_env, r)
        assert 0 < held < n
        assert_nothing_lost(own_env, r, writes)
        failures = runner.redis.failures
        wait_until(lambda: runner.redis.failures >= failures + 3, what="more failed batches")
        if not own_env.logical:
            assert queue_count(own_env) == held, "a failed batch must not be acknowledged"
        # Logical mode: nor the transaction of any row whose keys are still cached.
        assert_nothing_lost(own_env, r, writes)

        r.replicaof("NO", "ONE")
        wait_until(lambda: drained(own_env, r, writes[-1]), timeout_s=30, what="every key deleted")
        assert runner.redis.available is True
        assert listener.alive()
    finally:
        go_on.set()
        r.replicaof("NO", "ONE")
        listener.stop()
    assert runner.events_processed == n


def test_redis_refusing_writes_with_an_error_reply_is_an_outage(own_env: Env, spawn: Spawn) -> None:
    """Redis up but refusing writes for a while (a lost replica under min-replicas-to-write;
    MISCONF when a snapshot cannot be written) is an outage to wait out, like READONLY."""
    n = 100
    config = setup_users(own_env, rows=n)
    r = own_env.redis()
    listener = spawn(config)
    process = listener.process
    assert process is not None
    cache(r, range(1, n + 1))
    r.config_set("min-replicas-to-write", 1)  # every UNLINK: "NOREPLICAS Not enough ..."

    written = write(own_env, "UPDATE users SET email = 'new-' || email", ids=range(1, n + 1))
    wait_until(
        lambda: listener.logged("redis_unavailable") or process.poll() is not None,
        what="redis_unavailable or the listener's exit",
    )
    assert process.poll() is None, "the listener died on a Redis error reply"
    assert none_acknowledged(own_env, n, written)

    r.config_set("min-replicas-to-write", 0)
    wait_until(
        lambda: drained(own_env, r, written), what="every key deleted once Redis accepts writes"
    )
    assert count(listener, "redis_unavailable") == 1
    assert count(listener, "redis_available") == 1
    stop_listener(listener)


def test_a_writable_replica_named_by_redis_url_is_waited_out_not_written(
    own_env: Env, spawn: Spawn
) -> None:
    """A replica with replica-read-only no takes our UNLINKs and keeps them to itself,
    while its master serves the stale keys: the listener acknowledged every change (the
    review: 20 of 20 keys left on the master, in both modes). The role it reads at each
    identity check now makes it wait, as for an outage, until a master answers."""
    n = 10
    master = own_env.redis()
    master_port = redis_of(own_env).port
    replica_args = ["--replicaof", "127.0.0.1", str(master_port), "--replica-read-only", "no"]
    with RedisServer.create(replica_args) as replica_server:
        config = setup_users(own_env, rows=n)
        config.write_text(config.read_text().replace(own_env.redis_url, replica_server.url))
        cache(master, range(1, n + 1))
        listener = spawn(config)
        process = listener.process
        assert process is not None
        written = write(own_env, "UPDATE users SET email = 'new-' || email", ids=range(1, n + 1))
        wait_until(
            lambda: listener.logged("redis_unavailable") or process.poll() is not None,
            what="redis_unavailable or the listener's exit",
        )
        assert process.poll() is None, "the listener died on a replica"
        assert "answered as a replica" in listener.logged("redis_unavailable")[0]["error"]
        assert none_acknowledged(own_env, n, written)
        assert all(master.exists(*keys_of(i)) for i in range(1, n + 1))

        # Promoted: a master now, which the listener deletes from.
        replica = replica_server.client(decode_responses=True)
        replica.replicaof("NO", "ONE")
        wait_until(lambda: drained(own_env, replica, written), what="deleted on the new master")
        stop_listener(listener)


# --- PostgreSQL restarted -----------------------------------------------------------------


def test_postgres_restart_reconnects_and_relistens(own_env: Env, spawn: Spawn) -> None:
    config = setup_users(own_env, rows=10, poll_interval_ms=NO_POLL_MS)
    r = own_env.redis()
    listener = spawn(config)
    cache(r, [1])
    first = write(own_env, "UPDATE users SET email = 'a@y' WHERE id = 1", ids=range(1, 2))
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="a NOTIFY- or stream-driven delete")
    # Restarted when idle, its progress saved (not while a save is due, whose failure on
    # a terminated session would end the stream by itself).
    wait_until(lambda: acknowledged(own_env, first), what="progress saved")

    pg_of(own_env).restart()
    wait_until(lambda: listener.logged("postgres_available"), what="postgres_available")

    cache(r, [2])
    written = write(own_env, "UPDATE users SET email = 'b@y' WHERE id = 2", ids=range(2, 3))
    # With polling off, only a NOTIFY on a re-LISTENed connection (or a new stream) can
    # get here in time.
    wait_until(lambda: r.exists(*keys_of(2)) == 0, what="delete after the restart")
    # Progress is saved (the slot told) within 100 ms of going idle.
    wait_until(lambda: acknowledged(own_env, written), what="progress saved")
    assert count(listener, "postgres_unavailable") == 1
    assert count(listener, "postgres_available") == 1
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["logical"], ids=["logical"])  # trigger: a table row
def test_what_was_acknowledged_before_a_postgres_restart_is_not_done_again(
    own_env: Env, spawn: Spawn
) -> None:
    """Logical mode: before PostgreSQL 17, a restart puts the slot's confirmed position
    back to what its last checkpoint saved, which can be far behind what the listener
    confirmed. The next stream starts from the position the listener saved instead: the
    transactions it finished are not streamed, and deleted, again."""
    config = setup_users(own_env)
    r = own_env.redis()
    listener = spawn(config)
    own_env.sql("CHECKPOINT")  # (the slot as saved: before the writes)
    writes = [insert_users(own_env, first, 1_000) for first in range(1, 10_001, 1_000)]
    wait_until(lambda: acknowledged(own_env, writes[-1]), what="every write acknowledged")
    stop_listener(listener)
    pg_of(own_env).restart()  # (fast: a clean shutdown, which saves the slot from 17 on)
    cache(r, range(1, 3))  # (the app's cache, refilled since)
    again = spawn(config)
    written = write(own_env, "UPDATE users SET email = 'z@y' WHERE id = 1", ids=range(1, 2))
    wait_until(lambda: acknowledged(own_env, written), what="a change after the restart")
    assert stop_listener(again)["events"] == 1, "the writes before were streamed again"
    assert r.exists(*keys_of(2)) == 2, "a row not written since is not deleted again"


def test_postgres_down_when_listener_starts(own_env: Env, spawn: Spawn) -> None:
    n = 100
    config = setup_users(own_env)
    r = own_env.redis()
    written = insert_users(own_env, 1, n)
    cache(r, range(1, n + 1))
    pg_of(own_env).stop()

    listener = spawn(config)
    wait_until(lambda: listener.logged("postgres_unavailable"), what="postgres_unavailable")
    assert r.dbsize() == 2 * n
    pg_of(own_env).start()
    wait_until(lambda: drained(own_env, r, written), what="keys deleted once PostgreSQL is up")
    assert count(listener, "postgres_unavailable") == 1
    assert count(listener, "postgres_available") == 1
    stop_listener(listener)


@pytest.mark.parametrize("outage", ["redis", "postgres"])
def test_a_server_back_is_used_within_a_second_whatever_the_back_off_reached(
    own_env: Env, spawn: Spawn, outage: str
) -> None:
    """Every second a back-off sleeps past a server's return is a second of stale reads
    (a Redis restored from an old snapshot serves it; a PostgreSQL back takes writes).
    By default no sleep is longer than retry_max_ms, 1 s: a first delay of 20 s here is
    cut to it (with a max of 10 s, the default before, the first try came 9-11 s on)."""
    n = 20
    config = setup_users(
        own_env,
        retry_initial_ms=20_000,
        retry_max_ms=Settings.model_fields["retry_max_ms"].default,
    )
    r = own_env.redis()
    written = insert_users(own_env, 1, n)
    cache(r, range(1, n + 1))
    r.save()  # a stopped Redis comes back with the stale keys
    server: PostgresServer | RedisServer = (
        redis_of(own_env) if outage == "redis" else pg_of(own_env)
    )
    server.stop()
    listener = spawn(config)
    wait_until(lambda: listener.logged(f"{outage}_unavailable"), what=f"{outage}_unavailable")
    server.start()
    wait_until(
        lambda: drained(own_env, r, written),
        timeout_s=5,
        what="every key deleted within a few seconds of the server's return",
    )
    stop_listener(listener)


# --- changes committed while the listener was cut off -------------------------------------


@pytest.mark.parametrize("cut", ["restart", "terminate"])
def test_changes_while_disconnected_are_processed_on_reconnect(
    own_env: Env, spawn: Spawn, cut: str
) -> None:
    """NOTIFY sent while the listener is disconnected is lost: it must look at the queue
    (in logical mode: the slot keeps what was committed meanwhile). `terminate` ends the
    listener's backend: in logical mode the walsender of its stream."""
    n = 500
    # The listener logs in as its own role, so that the test can keep it out for a while.
    own_env.sql("CREATE ROLE cdc_listener LOGIN SUPERUSER")
    pg = pg_of(own_env)
    config = setup_users(
        own_env,
        rows=n,
        database_url=pg.dsn("app", user="cdc_listener"),
        poll_interval_ms=NO_POLL_MS,
    )
    r = own_env.redis()
    listener = spawn(config)
    wait_until(lambda: listener_backend(own_env), what="the listener's session")
    backend = listener_backend(own_env)
    assert backend is not None

    def refusals() -> int:
        """Reconnects PostgreSQL turned away (its log has one line per attempt)."""
        text = pg.logfile.read_text(errors="replace")
        return text.count('role "cdc_listener" is not permitted to log in')

    own_env.sql("ALTER ROLE cdc_listener NOLOGIN")
    refused_before = refusals()
    cut_at = time.monotonic()
    if cut == "restart":
        pg.restart()
    else:
        assert own_env.scalar("SELECT pg_terminate_backend(%s)", [backend[0]]) is True
    wait_until(lambda: listener.logged("postgres_unavailable"), what="postgres_unavailable")
    # It keeps trying to come back and is refused: it is out, not merely slow.
    wait_until(lambda: refusals() - refused_before >= 3, what="refused reconnects")

    cache(r, range(1, n + 1))
    # Its NOTIFY reaches nobody; nobody streams the slot.
    written = write(own_env, "UPDATE users SET email = 'new-' || email", ids=range(1, n + 1))
    assert none_acknowledged(own_env, n, written)
    assert r.dbsize() == 2 * n
    # Reconnects back off too.
    attempts, elapsed_s = refusals() - refused_before, time.monotonic() - cut_at
    assert attempts <= most_attempts(elapsed_s), (attempts, elapsed_s)

    own_env.sql("ALTER ROLE cdc_listener LOGIN")
    wait_until(
        lambda: drained(own_env, r, written), what="the missed changes processed on reconnect"
    )
    new_backend = listener_backend(own_env)
    assert new_backend is not None
    assert new_backend[0] != backend[0]

    # Re-LISTENed (or streaming again): a change now is deleted promptly with polling off.
    cache(r, [n + 1])
    insert_users(own_env, n + 1, 1)
    wait_until(lambda: r.exists(*keys_of(n + 1)) == 0, what="a NOTIFY- or stream-driven delete")
    assert count(listener, "postgres_unavailable") == 1, "one line per outage, not per retry"
    assert count(listener, "postgres_available") == 1
    stop_listener(listener)


# --- the listener's backend terminated in the middle of a batch ---------------------------


def test_backend_terminated_mid_batch_is_redelivered(own_env: Env) -> None:
    """pg_terminate_backend on the listener's backend (logical mode: its walsender) while
    a batch is in hand: that batch is not acknowledged, and comes again."""
    n = 3000
    config = setup_users(own_env, batch_size=20)
    r = own_env.redis()
    written = insert_users(own_env, 1, n)
    cache(r, range(1, n + 1))

    r.client_pause(PAUSE_MS, all=False)
    listener = ListenerThread.from_file(config)
    runner = listener.runner
    listener.start()
    try:
        wait_until(lambda: blocked_on_redis(r), what="the listener blocked on UNLINK")
        backend = listener_backend(own_env)
        assert backend is not None
        assert own_env.scalar("SELECT pg_terminate_backend(%s)", [backend[0]]) is True
        wait_until(lambda: listener_backend(own_env) is None, what="the backend to go")
        assert none_acknowledged(own_env, n, written), "the terminated batch was acknowledged"
        # Redis goes on: the UNLINKs land, but the acknowledgement died with the backend.
        r.client_unpause()
        wait_until(lambda: drained(own_env, r, written), what="every key deleted")
        assert runner.postgres.failures >= 1
        assert runner.postgres.available is True
        assert listener.alive()
    finally:
        r.client_unpause()
        listener.stop()
    if own_env.logical:
        # The batch in hand (and whatever of the stream was already received) was done
        # before the stream's end was noticed; the whole transaction came again.
        assert n + 50 <= runner.events_processed <= 2 * n, runner.events_processed
    else:
        assert runner.events_processed == n


# --- SIGTERM / SIGINT ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_when_idle_exits_0(env: Env, spawn: Spawn, signum: signal.Signals) -> None:
    config = setup_users(env, rows=1)
    listener = spawn(config)
    wait_until(lambda: listener_backend(env), what="the listener's session")
    stopped = stop_listener(listener, signum)
    assert stopped["events"] == 0
    wait_until(lambda: listener_sessions(env) == 0, timeout_s=5, what="its sessions closed")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_draining_finishes_the_batch_and_loses_nothing(
    own_env: Env, spawn: Spawn, signum: signal.Signals
) -> None:
    n = 30_000
    r = own_env.redis()
    try:
        first, config, writes = frozen_mid_drain(own_env, spawn, r, n)
        in_hand_and_left = pending(own_env, r)  # its batch's deletes are not done
        first.signal(signum)
    finally:
        r.client_unpause()
    stopped = exited_cleanly(first)

    left = pending(own_env, r)
    assert left < in_hand_and_left, "the batch in hand is finished, not abandoned"
    assert left > 0, "a stop request does not wait for the whole backlog"
    # Every event done was counted (trigger mode: acknowledged; logical mode, where a
    # transaction is acknowledged at its end only: every row whose keys are gone).
    assert stopped["events"] == n - left
    assert_nothing_lost(own_env, r, writes)
    again = redelivered(own_env, writes, left)
    if own_env.logical:
        # On the way out it confirmed every transaction it had finished.
        assert again < n, "finished transactions are acknowledged on a clean stop"

    second = spawn(config)
    wait_until(lambda: drained(own_env, r, writes[-1]), timeout_s=30, what="every key deleted")
    assert stop_listener(second)["events"] == again


@pytest.mark.parametrize("outage", ["redis", "postgres"])
def test_sigterm_during_an_outage_exits_0_and_keeps_the_events(
    own_env: Env, spawn: Spawn, outage: str
) -> None:
    n = 50
    # The first retry waits 30 s: only the stop request can end that wait in time.
    config = setup_users(own_env, retry_initial_ms=30_000, retry_max_ms=60_000)
    r = own_env.redis()
    written = insert_users(own_env, 1, n)
    cache(r, range(1, n + 1))
    r.save()  # a stopped Redis comes back with the cache it had
    server: PostgresServer | RedisServer = (
        redis_of(own_env) if outage == "redis" else pg_of(own_env)
    )
    server.stop()

    listener = spawn(config)
    wait_until(lambda: listener.logged(f"{outage}_unavailable"), what=f"{outage}_unavailable")
    signalled_at = time.monotonic()
    stopped = stop_listener(listener)
    assert time.monotonic() - signalled_at < 5, "woken out of its back-off"
    assert stopped["events"] == 0
    server.start()
    assert none_acknowledged(own_env, n, written)
    assert r.dbsize() == 2 * n

    after = spawn(config)
    wait_until(lambda: drained(own_env, r, written), what="every key deleted by the next listener")
    stop_listener(after)


# --- under load the listener stops NOTIFY, and takes it up again ----------------------------


def test_after_a_burst_notify_wakes_the_listener_again(own_env: Env) -> None:
    """Trigger mode: after a burst (NOTIFY off while busy) NOTIFY wakes it again. Logical
    mode has no NOTIFY to switch; the same burst must not leave the stream unread."""
    # Polling off: once the burst is over, only a re-LISTENed NOTIFY (or the stream) can
    # wake it in time.
    config = setup_users(own_env, rows=100, poll_interval_ms=NO_POLL_MS)
    r = own_env.redis()
    listener = ListenerThread.from_file(config)
    runner = listener.runner
    listener.start()
    try:
        # A burst: 50 commits held back by a paused Redis arrive as one batch of 49+,
        # far over the size at which the listener stops NOTIFY and polls instead.
        cache(r, range(1, 51))
        r.client_pause(PAUSE_MS, all=False)
        try:
            for i in range(1, 51):
                written = write(
                    own_env,
                    "UPDATE users SET email = 'b-' || email WHERE id = %s",
                    [i],
                    ids=range(i, i + 1),
                )
            wait_until(lambda: blocked_on_redis(r), what="the listener blocked on UNLINK")
        finally:
            r.client_unpause()
        wait_until(lambda: cached_ids(r) == set(), what="the burst invalidated")
        wait_until(lambda: runner.events_processed == 50, what="the burst counted")
        # Progress saved: the listener has nothing left to wake up for by itself.
        wait_until(lambda: acknowledged(own_env, written), what="progress saved")

        cache(r, [77])
        own_env.sql("UPDATE users SET email = 'q-' || email WHERE id = 77")
        wait_until(lambda: r.exists(*keys_of(77)) == 0, what="a NOTIFY- or stream-driven delete")
    finally:
        listener.stop()
