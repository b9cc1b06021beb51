"""/metrics, /healthz and /readyz of a real listener process, in both capture modes."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.support.env import Env, redis_of
from tests.support.faults import cache, keys_of, setup_users
from tests.support.listener import Spawn, run_cli, stop_listener
from tests.support.servers import free_port
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]


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
    config = setup_users(env, rows=20, metrics_port=port)
    listener = spawn(config)
    wait_until(lambda: probe(port, "/readyz")[0] == 200, what="the listener ready")
    r = env.redis()
    cache(r, range(1, 21))
    env.sql("UPDATE users SET email = 'm' || id || '@x' WHERE id <= 10")  # one transaction
    for i in range(11, 16):  # five more
        env.sql(f"DELETE FROM users WHERE id = {i}")
    wait_until(
        lambda: r.exists(*[k for i in range(1, 16) for k in keys_of(i)]) == 0, what="deletes"
    )

    def counted() -> bool:
        return (metric(scrape(port), "cdc_invalidator_events_total") or 0) >= 15

    wait_until(counted, what="the events counted")
    text = scrape(port)
    assert metric(text, "cdc_invalidator_keys_deleted_total") == 30
    # One observation per transaction: 1 UPDATE + 5 DELETEs.
    assert metric(text, "cdc_invalidator_commit_to_delete_seconds_count") == 6
    lag_sum = metric(text, "cdc_invalidator_commit_to_delete_seconds_sum")
    assert lag_sum is not None
    assert 0 < lag_sum < 6 * 5
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
    assert probe(active_port, "/readyz")[1]["role"] == "active"
    stop_listener(standby)
    stop_listener(active)


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
