"""Logs: JSON lines for machines, and never a password (real processes)."""

from __future__ import annotations

import json
import signal

import pytest

from cdc_invalidator.runner import DEAD_LETTER_ERRORS_TOLD
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.listener import ListenerProcess, Spawn, run_cli
from tests.support.sync import SYNC, install, settle, users_table
from tests.support.waits import wait_until

SECRET = "hunter2-do-not-log"


def test_listener_logs_json_without_passwords(env: Env) -> None:
    # A server that refuses connections: the listener logs the failure and retries.
    config = write_config(
        env.tmp_path / "config.toml",
        database_url=f"postgresql://app:{SECRET}@127.0.0.1:1/app",
        redis_url=f"redis://:{SECRET}@127.0.0.1:1/0",
        tables={"users": ["user:{id}"]},
    )
    listener = ListenerProcess(config, env.tmp_path / "listener.log").start()
    try:
        wait_until(lambda: listener.logged("postgres_unavailable"), what="postgres_unavailable")
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        listener.kill()
    text = (env.tmp_path / "listener.log").read_text()
    assert SECRET not in text
    for line in text.splitlines():
        record = json.loads(line)  # every line is one JSON object
        assert {"event", "level", "timestamp"} <= record.keys()
    loaded = listener.logged("config_loaded")[0]
    assert loaded["database_url"] == "postgresql://app:***@127.0.0.1:1/app"
    assert len(listener.logged("postgres_unavailable")) == 1


def test_cli_errors_do_not_show_passwords(env: Env) -> None:
    config = write_config(
        env.tmp_path / "config.toml",
        database_url=f"postgresql://app:{SECRET}@127.0.0.1:1/app",
        redis_url=env.redis_url,
        tables={"users": ["user:{id}"]},
    )
    for command in ("check", "status", "install"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 1, result
        assert (
            "cannot connect to PostgreSQL at postgresql://app:***@127.0.0.1:1/app" in result.stderr
        )
        assert SECRET not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("capture")
def test_dead_letters_of_a_table_dropped_from_the_config_are_logged_boundedly(
    env: Env, spawn: Spawn
) -> None:
    """A table removed from the configuration, install not run again, whose install
    recorded no templates (an earlier release's): each of its writes is a dead letter,
    kept with its error and counted, and was logged as a line of its own (5,000 lines
    in 2.5 s at 2,000 writes/s). Each error is logged once a minute,
    at most DEAD_LETTER_ERRORS_TOLD errors a minute (logical mode's name the transaction),
    the lines held back counted in the next one."""
    users_table(env)
    env.sql("CREATE TABLE orders (id int PRIMARY KEY)")
    install(env, {"public.users": ["user:{id}"], "public.orders": ["order:{id}"]})
    env.sql("UPDATE cdc_invalidator.mapping_v1 SET tables = NULL")
    smaller = env.config({"public.users": ["user:{id}"], **SYNC}, name="smaller.toml")
    r = env.redis()
    listener = spawn(smaller)
    writes = 3 * DEAD_LETTER_ERRORS_TOLD
    for i in range(writes):
        env.sql("INSERT INTO orders VALUES (%s)", [i])
        settle(env, r)  # a batch each
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == writes
    lines = listener.logged("event_dead_lettered")
    assert 1 <= len(lines) <= DEAD_LETTER_ERRORS_TOLD
    assert all("public.orders" in line["error"] for line in lines)
