"""Faults on real processes: whatever goes down, every committed change's keys end up deleted.

Each test breaks one thing for real (SIGKILL, a stopped or read-only Redis, a restarted
PostgreSQL, a terminated backend, SIGTERM/SIGINT) and checks the at-least-once guarantee
two ways: at the moment of the fault, no event has left the queue while its keys are still
in Redis (acknowledged after Redis, DESIGN.md trap 2); and after healing, every key is gone
and the queue is empty.

Deterministic without sleeps: a listener is held in the middle of a batch with
`CLIENT PAUSE WRITE` (its UNLINKs block, so it cannot have acknowledged that batch yet);
failures and retries are observed through PostgreSQL (`pg_stat_activity`,
`pg_stat_database.xact_rollback`, the server log), through Redis (`CLIENT LIST`) and
through the listener's own JSON log lines.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from cdc_invalidator.cli import main
from cdc_invalidator.servers import PostgresServer, RedisServer, free_port
from tests.conftest import Env
from tests.helpers import FAST, ListenerProcess, ListenerThread, wait_until, write_config

pytestmark = [pytest.mark.slow, pytest.mark.servers]

TEMPLATES = ["user:{id}", "user:email:{email}"]
KEY_ID = re.compile(r"^user:(?:email:u)?(\d+)(?:@x)?$")
APP_NAME = "cdc-invalidator"  # the listener's application_name (the default setting)
# A poll so slow that no test waits for it: what must happen promptly has to come from a
# NOTIFY (re-LISTEN after a reconnect) or from the batch taken on (re)connecting.
NO_POLL_MS = 600_000
# Long enough for any test here; a failed test's Redis unpauses by itself.
PAUSE_MS = 20_000

Spawn = Callable[..., ListenerProcess]


# --- the world: one table, two key templates ----------------------------------------------


def email(i: int) -> str:
    return f"u{i}@x"


def keys_of(i: int) -> list[str]:
    return [f"user:{i}", f"user:email:{email(i)}"]


def setup_users(
    env: Env, *, rows: int = 0, database_url: str | None = None, **settings: object
) -> Path:
    """users(id, email) with `rows` rows (queued before install: no events), installed."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    if rows:
        insert_users(env, 1, rows)
    config = write_config(
        env.tmp_path / "config.toml",
        database_url=database_url or env.dsn,
        redis_url=env.redis_url,
        tables={"public.users": TEMPLATES},
        **settings,
    )
    assert main(["install", "--config", str(config)]) == 0
    return config


def insert_users(env: Env, first: int, count: int) -> None:
    """One statement, one transaction: `count` INSERT events once installed."""
    env.sql(
        "INSERT INTO users SELECT i, 'u' || i || '@x' FROM generate_series(%s::int, %s::int) i",
        [first, first + count - 1],
    )


def cache(r: redis.Redis, ids: Sequence[int] | range, value: str = "stale") -> None:
    """What an app would have cached (or negatively cached) for these rows."""
    pipe = r.pipeline(transaction=False)
    ids = list(ids)
    for start in range(0, len(ids), 5000):
        pipe.mset({key: value for i in ids[start : start + 5000] for key in keys_of(i)})
    pipe.execute()


# Queue rows the listener has not acknowledged (its saved progress, as `status` reads it).
# Processed rows stay in the table until pruned, so the queue's size is not the measure.
PENDING = """
    SELECT q.id, (coalesce(q.new_row, q.old_row) ->> 'id')::int
    FROM cdc_invalidator.listener_state_v1 s
    JOIN cdc_invalidator.queue_v1 q
      ON q.xid >= pg_snapshot_xmin(s.snapshot)
     AND NOT pg_visible_in_snapshot(q.xid, s.snapshot)
     AND NOT coalesce(pg_visible_in_snapshot(q.xid, s.window_end)
                      AND (q.xid, q.id) <= (s.after_xid, s.after_id), false)
"""


def queue_count(env: Env) -> int:
    """Events not acknowledged yet."""
    with env.connect() as conn:
        return len(conn.execute(PENDING.encode()).fetchall())


def queued_ids(env: Env) -> set[int]:
    """The user ids of the events not acknowledged yet."""
    with env.connect() as conn:
        return {row[1] for row in conn.execute(PENDING.encode())}


def cached_ids(r: redis.Redis) -> set[int]:
    ids = set()
    for key in r.scan_iter("user:*", count=10_000):
        match = KEY_ID.match(key.decode() if isinstance(key, bytes) else str(key))
        assert match, f"unexpected key {key!r}"
        ids.add(int(match.group(1)))
    return ids


def assert_nothing_lost(env: Env, r: redis.Redis) -> None:
    """No event left the queue while one of its keys is still cached.

    The queue is read first: a key still cached afterwards was not deleted by then, so
    (acknowledging only after Redis) its event cannot have been acknowledged by then.
    """
    queued = queued_ids(env)
    lost = sorted(cached_ids(r) - queued)
    assert not lost, f"{len(lost)} events acknowledged with their keys still cached: {lost[:10]}"


def drained(env: Env, r: redis.Redis) -> bool:
    return queue_count(env) == 0 and r.dbsize() == 0


def listener_backend(env: Env) -> tuple[int, str] | None:
    """The listener's session (pid, state), if it is connected."""
    with env.connect() as conn:
        row = conn.execute(
            "SELECT pid, state FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            [APP_NAME],
        ).fetchone()
    return None if row is None else (row[0], row[1])


def blocked_on_redis(r: redis.Redis) -> bool:
    """Under CLIENT PAUSE WRITE: the listener sent its UNLINKs and Redis holds them.

    An at-least-once listener has not acknowledged that batch yet, whatever its design.
    """
    return any(
        client.get("name") == APP_NAME and "b" in client.get("flags", "")
        for client in r.client_list()
    )


FETCH_MARK = "The next events to invalidate"  # the first line of sql/fetch_batch.sql


def log_statements(env: Env) -> None:
    """Have the server log every statement, so that the listener's tries can be counted."""
    env.sql("ALTER SYSTEM SET log_statement = 'all'")
    env.sql("SELECT pg_reload_conf()")


def attempts(env: Env) -> int:
    """How many batches the listener tried to take, from the server's statement log
    (after log_statements): with Redis down, each one is a try."""
    return pg_of(env).logfile.read_text(errors="replace").count(FETCH_MARK)


def most_attempts(elapsed_s: float) -> int:
    """The most retries that exponential back-off (FAST settings, -10 % jitter) allows."""
    base, spent, attempts = FAST["retry_initial_ms"] / 1000, 0.0, 1
    while True:
        spent += base * 0.9
        if spent > elapsed_s:
            return attempts
        attempts += 1
        base = min(base * 2, FAST["retry_max_ms"] / 1000)


def pg_of(env: Env) -> PostgresServer:
    assert env.servers.pg is not None
    return env.servers.pg


def redis_of(env: Env) -> RedisServer:
    assert env.servers.redis is not None
    return env.servers.redis


def count(listener: ListenerProcess, event: str) -> int:
    return len(listener.logged(event))


def stop_listener(listener: ListenerProcess, signum: int = signal.SIGTERM) -> dict[str, Any]:
    """Stop it as an operator would; returns its `listener_stopped` line."""
    listener.signal(signum)
    return exited_cleanly(listener)


def exited_cleanly(listener: ListenerProcess) -> dict[str, Any]:
    """It exits 0 and says so once; returns its `listener_stopped` line."""
    assert listener.wait() == 0
    stopped = listener.logged("listener_stopped")
    assert len(stopped) == 1
    return stopped[0]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `cdc-invalidator run` processes; whatever is left is killed at teardown."""
    started: list[ListenerProcess] = []

    def start(config: Path) -> ListenerProcess:
        listener = ListenerProcess(config, tmp_path / f"listener-{len(started)}.log")
        started.append(listener)
        return listener.start()

    yield start
    for listener in started:
        listener.kill()


# --- SIGKILL mid-stream -------------------------------------------------------------------


def frozen_mid_drain(
    own_env: Env, spawn: Spawn, r: redis.Redis, n: int
) -> tuple[ListenerProcess, Path]:
    """A listener draining n changes, caught in the middle: some batches acknowledged,
    its next UNLINKs held by CLIENT PAUSE WRITE. The caller unpauses Redis."""
    # Small batches: the drain takes long enough to be caught in the middle.
    config = setup_users(own_env, batch_size=50)
    insert_users(own_env, 1, n)
    cache(r, range(1, n + 1))
    listener = spawn(config)
    wait_until(lambda: queue_count(own_env) < n, what="the listener to make progress")
    r.client_pause(PAUSE_MS, all=False)
    wait_until(lambda: blocked_on_redis(r), what="the listener blocked on UNLINK")
    return listener, config


def test_sigkill_mid_batch_redelivers_everything(own_env: Env, spawn: Spawn) -> None:
    n = 30_000
    r = own_env.redis()
    try:
        # Frozen mid-stream: its next UNLINKs block before it may acknowledge them.
        first, config = frozen_mid_drain(own_env, spawn, r, n)
        first.kill()  # SIGKILL: no handler, no rollback from the client side
        assert first.process is not None
        assert first.process.returncode == -signal.SIGKILL
    finally:
        r.client_unpause()

    left = queue_count(own_env)
    assert 0 < left < n, "the kill was meant to land mid-stream"
    assert r.dbsize() > 0, "some keys must still be cached when the listener dies"
    assert_nothing_lost(own_env, r)

    second = spawn(config)
    wait_until(lambda: drained(own_env, r), timeout_s=30, what="every key deleted")
    # The second listener re-did the killed batch: its keys were still there to delete.
    assert stop_listener(second)["events"] == left


# --- Redis down for a while, and back -----------------------------------------------------


def test_redis_down_events_wait_then_drain(own_env: Env, spawn: Spawn) -> None:
    n = 200
    # No idle polling: every statement the listener runs meanwhile is a try.
    config = setup_users(own_env, rows=n, poll_interval_ms=NO_POLL_MS)
    r = own_env.redis()
    log_statements(own_env)
    listener = spawn(config)

    # The app's cache, persisted: Redis comes back from this dump with the stale values
    # already loaded (setting them after the restart would race the listener's retry).
    cache(r, range(1, n + 1))
    r.save()
    before = attempts(own_env)
    measured_at = time.monotonic()
    redis_of(own_env).stop()

    own_env.sql("UPDATE users SET email = 'new-' || email")  # n events, committed
    wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
    # Let several back-off rounds go by, counted in the server's log: each failed try
    # takes its batch again.
    wait_until(lambda: attempts(own_env) - before >= 5, what="retries", timeout_s=20)
    retries = attempts(own_env) - before
    elapsed_s = time.monotonic() - measured_at

    assert queue_count(own_env) == n, "events wait in the queue while Redis is down"
    assert count(listener, "redis_unavailable") == 1, "one line per state change, not per retry"
    assert count(listener, "redis_available") == 0
    # Backed off, not a hot loop: no more tries than the exponential delays leave room for
    # (plus the one the UPDATE's NOTIFY started).
    assert retries <= most_attempts(elapsed_s) + 1, (retries, elapsed_s)

    redis_of(own_env).start()  # same port, loads the dump
    wait_until(lambda: drained(own_env, r), what="stale keys deleted once Redis is back")
    wait_until(lambda: listener.logged("redis_available"), what="redis_available")
    assert count(listener, "redis_unavailable") == 1
    assert count(listener, "redis_available") == 1
    stopped = stop_listener(listener)
    # Every stale key came back with the dump and was deleted by this listener.
    assert stopped["keys_deleted"] == 2 * n
    assert stopped["events"] == n


def test_redis_down_when_listener_starts(own_env: Env, spawn: Spawn) -> None:
    n = 100
    config = setup_users(own_env)
    r = own_env.redis()
    cache(r, range(1, n + 1))
    r.save()
    redis_of(own_env).stop()
    insert_users(own_env, 1, n)

    log_statements(own_env)
    before = attempts(own_env)
    listener = spawn(config)
    wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
    wait_until(lambda: attempts(own_env) - before >= 3, what="retries", timeout_s=20)
    assert queue_count(own_env) == n
    assert count(listener, "redis_unavailable") == 1

    redis_of(own_env).start()
    wait_until(lambda: drained(own_env, r), what="keys deleted once Redis is up")
    wait_until(lambda: listener.logged("redis_available"), what="redis_available")
    assert count(listener, "redis_unavailable") == 1
    assert count(listener, "redis_available") == 1
    assert stop_listener(listener)["keys_deleted"] == 2 * n


# --- acknowledge after Redis (DESIGN.md trap 2) -------------------------------------------


def test_redis_refusing_writes_mid_drain_acknowledges_nothing(own_env: Env) -> None:
    n = 20_000
    config = setup_users(own_env, batch_size=500)
    r = own_env.redis()
    insert_users(own_env, 1, n)
    cache(r, range(1, n + 1))

    listener = ListenerThread.from_file(config)
    runner = listener.runner
    listener.start()
    try:
        wait_until(lambda: queue_count(own_env) < n, what="the listener to make progress")
        # A replica of a master that does not exist: keeps its data, answers every
        # UNLINK with READONLY. Redis fails in the middle of a batch, deterministically.
        r.replicaof("127.0.0.1", str(free_port()))
        wait_until(lambda: runner.redis.failures >= 3, what="batches failing on Redis")
        assert runner.redis.available is False
        held = queue_count(own_env)
        assert 0 < held < n
        assert_nothing_lost(own_env, r)
        failures = runner.redis.failures
        wait_until(lambda: runner.redis.failures >= failures + 3, what="more failed batches")
        assert queue_count(own_env) == held, "a failed batch must not be acknowledged"
        assert_nothing_lost(own_env, r)

        r.replicaof("NO", "ONE")
        wait_until(lambda: drained(own_env, r), timeout_s=30, what="every key deleted")
        assert runner.redis.available is True
        assert listener.alive()
    finally:
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

    own_env.sql("UPDATE users SET email = 'new-' || email")
    wait_until(
        lambda: listener.logged("redis_unavailable") or process.poll() is not None,
        what="redis_unavailable or the listener's exit",
    )
    assert process.poll() is None, "the listener died on a Redis error reply"
    assert queue_count(own_env) == n

    r.config_set("min-replicas-to-write", 0)
    wait_until(lambda: drained(own_env, r), what="every key deleted once Redis accepts writes")
    assert count(listener, "redis_unavailable") == 1
    assert count(listener, "redis_available") == 1
    stop_listener(listener)


# --- PostgreSQL restarted -----------------------------------------------------------------


def test_postgres_restart_reconnects_and_relistens(own_env: Env, spawn: Spawn) -> None:
    config = setup_users(own_env, rows=10, poll_interval_ms=NO_POLL_MS)
    r = own_env.redis()
    listener = spawn(config)
    cache(r, [1])
    own_env.sql("UPDATE users SET email = 'a@y' WHERE id = 1")
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="a NOTIFY-driven delete")

    pg_of(own_env).restart()
    wait_until(lambda: listener.logged("postgres_available"), what="postgres_available")

    cache(r, [2])
    own_env.sql("UPDATE users SET email = 'b@y' WHERE id = 2")
    # With polling off, only a NOTIFY on a re-LISTENed connection can get here in time.
    wait_until(lambda: r.exists(*keys_of(2)) == 0, what="delete after the restart")
    # Progress is saved within 100 ms of going idle.
    wait_until(lambda: queue_count(own_env) == 0, what="progress saved")
    assert count(listener, "postgres_unavailable") == 1
    assert count(listener, "postgres_available") == 1
    stop_listener(listener)


def test_postgres_down_when_listener_starts(own_env: Env, spawn: Spawn) -> None:
    n = 100
    config = setup_users(own_env)
    r = own_env.redis()
    insert_users(own_env, 1, n)
    cache(r, range(1, n + 1))
    pg_of(own_env).stop()

    listener = spawn(config)
    wait_until(lambda: listener.logged("postgres_unavailable"), what="postgres_unavailable")
    assert r.dbsize() == 2 * n
    pg_of(own_env).start()
    wait_until(lambda: drained(own_env, r), what="keys deleted once PostgreSQL is up")
    assert count(listener, "postgres_unavailable") == 1
    assert count(listener, "postgres_available") == 1
    stop_listener(listener)


# --- changes committed while the listener was cut off -------------------------------------


@pytest.mark.parametrize("cut", ["restart", "terminate"])
def test_changes_while_disconnected_are_processed_on_reconnect(
    own_env: Env, spawn: Spawn, cut: str
) -> None:
    """NOTIFY sent while the listener is disconnected is lost: it must look at the queue."""
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
    own_env.sql("UPDATE users SET email = 'new-' || email")  # its NOTIFY reaches nobody
    assert queue_count(own_env) == n
    assert r.dbsize() == 2 * n
    # Reconnects back off too.
    attempts, elapsed_s = refusals() - refused_before, time.monotonic() - cut_at
    assert attempts <= most_attempts(elapsed_s), (attempts, elapsed_s)

    own_env.sql("ALTER ROLE cdc_listener LOGIN")
    wait_until(lambda: drained(own_env, r), what="the missed changes processed on reconnect")
    new_backend = listener_backend(own_env)
    assert new_backend is not None
    assert new_backend[0] != backend[0]

    # Re-LISTENed: a change now is deleted promptly with polling off.
    cache(r, [n + 1])
    insert_users(own_env, n + 1, 1)
    wait_until(lambda: r.exists(*keys_of(n + 1)) == 0, what="a NOTIFY-driven delete")
    assert count(listener, "postgres_unavailable") == 1, "one line per outage, not per retry"
    assert count(listener, "postgres_available") == 1
    stop_listener(listener)


# --- the listener's backend terminated in the middle of a batch ---------------------------


def test_backend_terminated_mid_batch_is_redelivered(own_env: Env) -> None:
    n = 3000
    config = setup_users(own_env, batch_size=50)
    r = own_env.redis()
    insert_users(own_env, 1, n)
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
        assert queue_count(own_env) == n, "the terminated batch was not acknowledged"
        # Redis goes on: the UNLINKs land, but the acknowledgement died with the backend.
        r.client_unpause()
        wait_until(lambda: drained(own_env, r), what="every key deleted")
        assert runner.postgres.failures >= 1
        assert runner.postgres.available is True
        assert listener.alive()
    finally:
        r.client_unpause()
        listener.stop()
    assert runner.events_processed == n


# --- SIGTERM / SIGINT ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_when_idle_exits_0(env: Env, spawn: Spawn, signum: signal.Signals) -> None:
    config = setup_users(env, rows=1)
    listener = spawn(config)
    wait_until(lambda: listener_backend(env), what="the listener's session")
    stopped = stop_listener(listener, signum)
    assert stopped["events"] == 0
    assert listener_backend(env) is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_draining_finishes_the_batch_and_loses_nothing(
    own_env: Env, spawn: Spawn, signum: signal.Signals
) -> None:
    n = 30_000
    r = own_env.redis()
    try:
        first, config = frozen_mid_drain(own_env, spawn, r, n)
        in_hand_and_left = queue_count(own_env)  # its batch's deletes are not committed
        first.signal(signum)
    finally:
        r.client_unpause()
    stopped = exited_cleanly(first)

    left = queue_count(own_env)
    assert left < in_hand_and_left, "the batch in hand is finished, not abandoned"
    assert left > 0, "a stop request does not wait for the whole backlog"
    assert stopped["events"] == n - left, "every acknowledged event was counted as done"
    assert_nothing_lost(own_env, r)

    second = spawn(config)
    wait_until(lambda: drained(own_env, r), timeout_s=30, what="every key deleted")
    assert stop_listener(second)["events"] == left


@pytest.mark.parametrize("outage", ["redis", "postgres"])
def test_sigterm_during_an_outage_exits_0_and_keeps_the_events(
    own_env: Env, spawn: Spawn, outage: str
) -> None:
    n = 50
    # The first retry waits 30 s: only the stop request can end that wait in time.
    config = setup_users(own_env, retry_initial_ms=30_000, retry_max_ms=60_000)
    r = own_env.redis()
    insert_users(own_env, 1, n)
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
    assert queue_count(own_env) == n
    assert r.dbsize() == 2 * n

    after = spawn(config)
    wait_until(lambda: drained(own_env, r), what="every key deleted by the next listener")
    stop_listener(after)


# --- under load the listener stops NOTIFY, and takes it up again ----------------------------


def test_after_a_burst_notify_wakes_the_listener_again(own_env: Env) -> None:
    # Polling off: once the burst is over, only a re-LISTENed NOTIFY can wake it in time.
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
                own_env.sql("UPDATE users SET email = 'b-' || email WHERE id = %s", [i])
            wait_until(lambda: blocked_on_redis(r), what="the listener blocked on UNLINK")
        finally:
            r.client_unpause()
        wait_until(lambda: cached_ids(r) == set(), what="the burst invalidated")
        wait_until(lambda: runner.events_processed == 50, what="the burst counted")
        # Progress saved: the listener has nothing left to wake up for by itself.
        wait_until(lambda: queue_count(own_env) == 0, what="progress saved")

        cache(r, [77])
        own_env.sql("UPDATE users SET email = 'q-' || email WHERE id = 77")
        wait_until(lambda: r.exists(*keys_of(77)) == 0, what="a NOTIFY-driven delete")
    finally:
        listener.stop()
