"""/metrics, /healthz and /readyz of a real listener process, in both capture modes."""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdc_invalidator.capture.walstream import WalStream
from tests.support.env import Env, redis_of
from tests.support.faults import blocked_on_redis, cache, keys_of, setup_users
from tests.support.listener import ListenerProcess, Spawn, run_cli, stop_listener
from tests.support.roles import login_role
from tests.support.servers import free_port
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

# CLIENT PAUSE WRITE: longer than any test holds the listener's deletes (it unpauses).
PAUSE_MS = 30_000
# A lag the listener reports against the test's own clock: the listener rounds to the
# millisecond, and logical mode reads the server's clock to within half a round trip.
CLOCKS_S = 0.01


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    code, body = get(port, path)
    return code, json.loads(body) if body else {}


def metric(text: str, name: str, labels: str = "") -> float | None:
    """A sample's value from Prometheus text: `name{labels} value`."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def scrape(port: int) -> str:
    code, text = get(port, "/metrics")
    assert code == 200
    return text


def test_metrics_count_the_work_and_the_lag(env: Env, spawn: Spawn) -> None:
    port = free_port()
    max_lag_s = 0.5
    config = setup_users(
        env, rows=20, metrics_port=port, ready_max_lag_s=max_lag_s, redis_timeout_s=60
    )
    listener = spawn(config)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="the listener ready")
    r = env.redis()
    cache(r, range(1, 21))
    # Redis holds the deletes: each transaction's lag includes the hold, which lasts until
    # the listener is more than max_lag_s behind.
    r.client_pause(PAUSE_MS, all=False)
    spans: list[tuple[float, float]] = []  # each transaction's start and end, our clock

    def transaction(sql: str) -> None:
        before = time.monotonic()
        env.sql(sql)
        spans.append((before, time.monotonic()))

    try:
        transaction("UPDATE users SET email = 'm' || id || '@x' WHERE id <= 10")
        for i in range(11, 16):  # five more
            transaction(f"DELETE FROM users WHERE id = {i}")
        wait_until(lambda: blocked_on_redis(r), what="the listener's UNLINKs held")
        wait_until(lambda: probe(port, "/readyz")[0] == 503, what="the listener behind")
    finally:
        unpaused = time.monotonic()
        r.client_unpause()
    wait_until(
        lambda: r.exists(*[k for i in range(1, 16) for k in keys_of(i)]) == 0, what="deletes"
    )

    def observed() -> bool:
        count = metric(scrape(port), "cdc_invalidator_commit_to_delete_seconds_count")
        return (count or 0) >= 6

    wait_until(observed, what="the lags observed")
    done = time.monotonic()
    text = scrape(port)
    assert metric(text, "cdc_invalidator_events_total") == 15
    assert metric(text, "cdc_invalidator_keys_deleted_total") == 30
    # One observation per transaction: 1 UPDATE + 5 DELETEs.
    assert metric(text, "cdc_invalidator_commit_to_delete_seconds_count") == 6
    lag_sum = metric(text, "cdc_invalidator_commit_to_delete_seconds_sum")
    assert lag_sum is not None
    # In seconds: each transaction waited from its end at least until the unpause (the
    # first one over max_lag_s), and took from its start at most until all were observed:
    # milliseconds or microseconds counted as seconds fall far outside.
    least = sum(unpaused - end for _, end in spans)
    most = sum(done - start for start, _ in spans)
    assert least - 6 * CLOCKS_S <= lag_sum <= most + 6 * CLOCKS_S, (least, lag_sum, most)
    assert metric(text, "cdc_invalidator_active") == 1
    assert metric(text, "cdc_invalidator_up", 'store="redis"') == 1
    assert metric(text, "cdc_invalidator_up", 'store="postgres"') == 1
    assert metric(text, "cdc_invalidator_status_up") == 1
    if env.logical:
        assert metric(text, "cdc_invalidator_slot_lag_bytes") is not None
        assert metric(text, "cdc_invalidator_slot_active") == 1
    else:
        assert metric(text, "cdc_invalidator_notify_queue_usage") is not None
        # The backlog as `status` reads it: from the progress saved (within 0.1 s).
        wait_until(
            lambda: metric(scrape(port), "cdc_invalidator_backlog_events") == 0,
            what="backlog 0",
        )
    assert metric(text, "cdc_invalidator_dead_letters_total") == 0
    code, health = probe(port, "/healthz")
    assert (code, health["status"], health["role"]) == (200, "ok", "active")
    stop_listener(listener)


def test_a_listener_stuck_on_a_lock_is_not_ready(env: Env, spawn: Spawn) -> None:
    """A lock on a table of ours (a DBA's LOCK TABLE, a VACUUM FULL) holds the listener's
    next statement, and the loop stops turning: nothing is invalidated. /readyz said 200
    with behind_s near 0 until the 60 s stall rule (a review held it 45 s, keys stale
    throughout). A loop that has not turned for longer than ready_max_lag_s is behind by
    that much."""
    port = free_port()
    config = setup_users(env, rows=10, metrics_port=port, ready_max_lag_s=0.5)
    listener = spawn(config)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="the listener ready")
    r = env.redis()
    cache(r, range(1, 3))
    ours = "cdc_invalidator.slot_state_v1" if env.logical else "cdc_invalidator.listener_state_v1"
    with env.connect() as locker:
        locker.execute(f"BEGIN; LOCK TABLE {ours} IN ACCESS EXCLUSIVE MODE")
        env.sql("UPDATE users SET email = 'l1@x' WHERE id = 1")
        env.sql("UPDATE users SET email = 'l2@x' WHERE id = 2")
        wait_until(lambda: probe(port, "/readyz")[0] == 503, what="not ready while stuck")
        _, health = probe(port, "/readyz")
        assert health["behind_s"] > 0.5, health
        assert health["loop_age_s"] > 0.5, health
        locker.execute("ROLLBACK")
    wait_until(lambda: r.exists(*keys_of(1), *keys_of(2)) == 0, what="deletes once unlocked")
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="ready again")
    stop_listener(listener)


def test_a_transaction_larger_than_a_batch_held_up_is_behind(env: Env, spawn: Spawn) -> None:
    """Its first batch holds no commit yet (logical mode reads it later in the stream):
    held up by Redis, the listener is behind from the transaction's commit time all
    the same."""
    port = free_port()
    config = setup_users(
        env, rows=10, metrics_port=port, ready_max_lag_s=0.5, batch_size=4, redis_timeout_s=60
    )
    listener = spawn(config)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="the listener ready")
    r = env.redis()
    cache(r, range(1, 11))
    r.client_pause(PAUSE_MS, all=False)
    try:
        env.sql("UPDATE users SET email = 'm' || id || '@x'")  # 10 changes: 3 batches
        wait_until(lambda: blocked_on_redis(r), what="the listener's UNLINKs held")
        wait_until(lambda: probe(port, "/readyz")[0] == 503, what="the listener behind")
        assert probe(port, "/readyz")[1]["behind_s"] > 0.5
    finally:
        r.client_unpause()
    wait_until(lambda: r.exists(*[k for i in range(1, 11) for k in keys_of(i)]) == 0, what="gone")
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="ready again")
    stop_listener(listener)


def test_readyz_fails_while_redis_is_down_and_counts_the_outage(own_env: Env, spawn: Spawn) -> None:
    port = free_port()
    config = setup_users(own_env, rows=1, metrics_port=port)
    listener = spawn(config)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="the listener ready")
    redis_of(own_env).stop()
    own_env.sql("UPDATE users SET email = 'x@x'")  # a try that fails

    wait_until(lambda: probe(port, "/readyz")[0] == 503, what="not ready without Redis")
    ready = probe(port, "/readyz")[1]
    assert ready["redis"] is False
    assert ready["postgres"] is True
    assert probe(port, "/healthz")[0] == 200, "alive: it is retrying, not stuck"
    text = scrape(port)
    assert metric(text, "cdc_invalidator_up", 'store="redis"') == 0
    assert (metric(text, "cdc_invalidator_errors_total", 'store="redis"') or 0) >= 1

    redis_of(own_env).start()
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="ready again")
    text = scrape(port)
    assert metric(text, "cdc_invalidator_reconnects_total", 'store="redis"') == 1
    assert metric(text, "cdc_invalidator_up", 'store="redis"') == 1
    stop_listener(listener)


def test_a_standby_is_ready_and_says_so(env: Env, spawn: Spawn) -> None:
    active_port, standby_port = free_port(), free_port()
    config = setup_users(env, metrics_port=active_port)
    active = spawn(config)
    wait_until(lambda: probe(active_port, "/readyz")[0] == 200, what="the first listener ready")
    standby = spawn(config, {"CDC_INVALIDATOR_METRICS_PORT": str(standby_port)})
    wait_until(lambda: standby.logged("standby"), what="the second one in standby")
    wait_until(lambda: probe(standby_port, "/readyz")[0] == 200, what="the standby ready")
    assert probe(standby_port, "/readyz")[1]["role"] == "standby"
    assert metric(scrape(standby_port), "cdc_invalidator_active") == 0
    # It deletes nothing, but Redis answers it: not reported down (SRE review: 0).
    wait_until(lambda: probe(standby_port, "/readyz")[1]["redis"], what="Redis up, standby")
    assert metric(scrape(standby_port), "cdc_invalidator_up", 'store="redis"') == 1
    assert probe(active_port, "/readyz")[1]["role"] == "active"
    stop_listener(standby)
    stop_listener(active)


def consumed_and_ready(env: Env, port: int, listener: ListenerProcess, *, what: str) -> None:
    """Once what held the source is gone: a change's keys deleted, /readyz 200; stopped."""
    r = env.redis()
    cache(r, [1])
    env.sql("UPDATE users SET email = 'new@x' WHERE id = 1")
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what=what)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="ready")
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["trigger"])  # logical mode's slot needs REPLICATION
@pytest.mark.parametrize("whose", ["another role's", "the listener's role's"])
def test_a_session_holding_the_queues_lock_is_named_and_not_ready(
    env: Env, spawn: Spawn, whose: str
) -> None:
    """Any role that can connect may take the advisory lock the listeners take to
    consume the queue: every listener then waits on standby, and nothing is invalidated,
    for as long as that session lasts. The review saw /readyz say 200 standby meanwhile;
    the SRE review saw it again with a psql session of the listener's own role (the docs
    print the pg_advisory_lock line), which every listener took for "another listener".
    A holder is a listener like this one only with its role and application_name: the
    listener names any other and is not ready until it ends."""
    port = free_port()
    config = setup_users(env, rows=2, metrics_port=port)
    other = login_role(env, "squatter_") if whose == "another role's" else nullcontext(None)
    with other as role:
        squatter = psycopg.connect(
            make_conninfo(env.dsn, user=role, application_name="psql"), autocommit=True
        )
        try:
            squatter.execute("SELECT pg_advisory_lock(hashtext('cdc_invalidator.queue_v1'))")
            pid = squatter.info.backend_pid
            listener = spawn(config)
            wait_until(
                lambda: listener.logged("standby_behind_a_foreign_session"),
                what="the holder named",
            )
            holder = listener.logged("standby_behind_a_foreign_session")[0]["holder"]
            named = f"backend {pid} (role {squatter.info.user}, application_name 'psql')"
            assert named in holder, holder
            assert f"pg_terminate_backend({pid})" in holder, holder
            wait_until(lambda: probe(port, "/readyz")[0] == 503, what="not ready")
            assert probe(port, "/readyz")[1]["held_by"] == holder
        finally:
            squatter.close()
        consumed_and_ready(env, port, listener, what="consumed once the session ended")


@pytest.mark.parametrize("capture", ["logical"])
def test_a_slot_made_behind_a_long_transaction_is_waited_for_in_the_loop(
    env: Env, spawn: Spawn
) -> None:
    """Making a slot waits for every transaction running then to end: behind a long one
    the listener sat silent in that statement (a review: 51 s), its loop still, so that
    a liveness probe failed after 60 s (a restart only restarts the wait), and /readyz
    said PostgreSQL was down. It waits in its loop instead: alive, not ready, PostgreSQL
    up, the transaction named; it makes the slot once that ends, and sweeps."""
    port = free_port()
    config = setup_users(env, rows=2, metrics_port=port)
    env.sql("SELECT pg_drop_replication_slot('cdc_invalidator')")  # lost: made again
    r = env.redis()
    cache(r, [1])
    with env.connect() as blocker:
        blocker.execute("BEGIN; SELECT pg_current_xact_id()")
        pid = blocker.info.backend_pid
        wait_until(
            lambda: env.scalar(
                "SELECT now() - xact_start > interval '1 second' FROM pg_stat_activity"
                " WHERE pid = %s",
                [pid],
            ),
            what="the transaction a second old",
        )
        listener = spawn(config)
        wait_until(lambda: listener.logged("slot_creation_waits"), what="the wait said")
        holder = listener.logged("slot_creation_waits")[0]["holder"]
        assert f"backend {pid} " in holder, holder
        assert f"pg_terminate_backend({pid})" in holder, holder
        wait_until(lambda: probe(port, "/readyz")[0] == 503, what="not ready")
        code, body = probe(port, "/readyz")
        assert (code, body["postgres"], body["held_by"]) == (503, True, holder), body
        ages: list[float] = []

        def turned() -> bool:
            code, body = probe(port, "/healthz")
            assert code == 200, body
            ages.append(body["loop_age_s"])
            return any(later < earlier for earlier, later in itertools.pairwise(ages))

        wait_until(turned, what="the loop turning while it waits")
        assert listener.logged("slot_created") == [], "it waits"
        # One begun once it waits is left to the statement's own wait (on a server where
        # long ones overlap without end, the loop would wait forever).
        later = env.connect()
        later.execute("BEGIN; SELECT pg_current_xact_id()")
        wait_until(
            lambda: env.scalar(
                "SELECT now() - xact_start > interval '1 second' FROM pg_stat_activity"
                " WHERE pid = %s",
                [later.info.backend_pid],
            ),
            what="the later transaction a second old",
        )
        # And a newer one still running: an id given after the later one's (CI: the
        # later one was counted among the first, its id read off by every one running).
        newer = env.connect()
        newer.execute("BEGIN; SELECT pg_current_xact_id()")
    wait_until(
        lambda: env.scalar(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query LIKE '%%pg_create_logical_replication_slot%%' AND pid <> pg_backend_pid()"
        ),
        what="the slot's statement, behind the later transaction",
    )
    assert len(listener.logged("slot_creation_waits")) == 1, "said once, of the first"
    for running in (later, newer):
        running.execute("COMMIT")
        running.close()
    wait_until(lambda: listener.logged("slot_created"), what="the slot made once both ended")
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the sweep owed")
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="ready")
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["logical"])
def test_another_client_streaming_the_slot_is_named_and_not_ready(env: Env, spawn: Spawn) -> None:
    """pg_recvlogical (or anything else) streaming our slot: the listener waited as a
    standby behind "another listener", /readyz 200, slot_active 1, check "ok: streamed",
    and the keys stayed cached for as long as it streamed (SRE review). It is named, and
    /readyz answers 503; once it stops, the listener streams (and sweeps what it took)."""
    port = free_port()
    config = setup_users(env, rows=2, metrics_port=port)
    foreign = psycopg.connect(
        make_conninfo(env.dsn, replication="database", application_name="pg_recvlogical"),
        autocommit=True,
    )
    try:
        WalStream.start(
            foreign,
            "cdc_invalidator",
            {"proto_version": "1", "publication_names": "cdc_invalidator"},
        )
        pid = foreign.info.backend_pid
        listener = spawn(config)
        wait_until(
            lambda: listener.logged("standby_behind_a_foreign_session"), what="the holder named"
        )
        holder = listener.logged("standby_behind_a_foreign_session")[0]["holder"]
        assert f"backend {pid} (role {foreign.info.user}, application_name 'pg_recvlogical')" in (
            holder
        ), holder
        wait_until(lambda: probe(port, "/readyz")[0] == 503, what="not ready")
    finally:
        foreign.close()
    consumed_and_ready(env, port, listener, what="streamed once the client stopped")


def test_unknown_path_is_404_and_a_taken_port_is_a_clear_error(env: Env, spawn: Spawn) -> None:
    port = free_port()
    config = setup_users(env, metrics_port=port)
    listener = spawn(config)
    wait_until(lambda: probe(port, "/healthz")[0] == 200, what="the probes up")
    assert get(port, "/nope")[0] == 404
    second = run_cli("run", "--config", str(config))  # the same port: taken
    assert second.returncode == 1
    failed = [json.loads(line) for line in second.stdout.splitlines() if "probes_failed" in line]
    assert len(failed) == 1
    assert f":{port}" in failed[0]["error"]
    assert "Traceback" not in second.stderr
    stop_listener(listener)


def test_second_deletes_that_undo_a_late_set_are_counted(env: Env, spawn: Spawn) -> None:
    port = free_port()
    config = setup_users(env, rows=1, metrics_port=port, second_delete_ms=300)
    listener = spawn(config)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="the listener ready")
    r = env.redis()
    cache(r, [1])
    env.sql("UPDATE users SET email = 'late@x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="the first delete")
    r.set("user:1", "stale")  # a slow reader's SET of the old row
    wait_until(lambda: r.exists("user:1") == 0, what="the second delete")
    wait_until(
        lambda: metric(scrape(port), "cdc_invalidator_keys_deleted_again_total") == 1,
        what="the second delete counted",
    )
    stop_listener(listener)


def test_readyz_fails_while_the_listener_is_behind_and_says_by_how_much(
    env: Env, spawn: Spawn
) -> None:
    """Redis holds the listener's deletes (CLIENT PAUSE WRITE): Redis answers, the loop is
    not stalled for long, but the change in hand gets older. /readyz fails once it is
    older than ready_max_lag_s, with its age as the test's own clock bounds it, and is
    ready again once the listener caught up."""
    port = free_port()
    max_lag_s = 0.5
    # Redis' socket timeout well past the pause: the deletes are held, not failed.
    config = setup_users(
        env, rows=1, metrics_port=port, ready_max_lag_s=max_lag_s, redis_timeout_s=60
    )
    listener = spawn(config)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="the listener ready")
    r = env.redis()
    cache(r, [1])
    r.client_pause(PAUSE_MS, all=False)
    try:
        began = time.monotonic()
        env.sql("UPDATE users SET email = 'late@x' WHERE id = 1")
        committed = time.monotonic()
        wait_until(lambda: blocked_on_redis(r), what="the listener's UNLINKs held")
        seen: list[tuple[float, int, dict[str, Any], float]] = []

        def not_ready() -> bool:
            asked = time.monotonic()
            code, body = probe(port, "/readyz")
            seen.append((asked, code, body, time.monotonic()))
            return code == 503

        wait_until(not_ready, what="not ready: behind")
        asked, _, ready, answered = seen[-1]
        assert (ready["role"], ready["postgres"], ready["redis"]) == ("active", True, True)
        behind = ready["behind_s"]
        assert behind >= max_lag_s  # (the body rounds to the millisecond)
        # The change's age when the probe was answered, by our clock: it was made between
        # `began` and `committed`, and the probe answered between `asked` and `answered`.
        # (Rounded to the millisecond; the servers' clocks are this machine's.)
        assert asked - committed - CLOCKS_S <= behind <= answered - began + CLOCKS_S, seen[-1]
        # Not ready for that reason alone: healthy otherwise (the loop waits on Redis).
        assert probe(port, "/healthz")[0] == 200
    finally:
        r.client_unpause()
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the held deletes done")
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="ready again")
    assert probe(port, "/readyz")[1]["behind_s"] == 0, "caught up"
    stop_listener(listener)
