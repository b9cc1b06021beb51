"""Logs: JSON lines for machines, and never a password (real processes)."""

from __future__ import annotations

import json
import signal

from tests.support.config import write_config
from tests.support.env import Env
from tests.support.listener import ListenerProcess, run_cli
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
