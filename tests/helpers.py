"""Helpers shared by the test modules: waiting on conditions, configs, listeners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cdc_invalidator.listener import build_listener
from cdc_invalidator.settings import Settings, load_settings
from cdc_invalidator.shutdown import Stopper

# Test settings: fast polling and back-off so that faults heal within a test's patience.
RETRY_INITIAL_MS, RETRY_MAX_MS = 20, 300
FAST: dict[str, object] = {
    "poll_interval_ms": 200,
    "status_interval_ms": 100,
    "prune_every_ms": 0,
    "retry_initial_ms": RETRY_INITIAL_MS,
    "retry_max_ms": RETRY_MAX_MS,
    "connect_timeout_s": 2,
    "redis_timeout_s": 2,
    # Processed queue rows go at once, as the queue-counting tests expect; the replay
    # tests keep them.
    "replay_history": "0s",
}


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 15.0, what: str = "condition"
) -> None:
    """Poll a condition until it holds (the event we wait on), or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    path: Path,
    *,
    database_url: str,
    redis_url: str,
    tables: Mapping[str, Sequence[str]],
    **settings: object,
) -> Path:
    """A TOML config file like a user would write; FAST settings unless overridden."""
    lines = [f"database_url = {toml_value(database_url)}", f"redis_url = {toml_value(redis_url)}"]
    for key, value in {**FAST, **settings}.items():
        lines.append(f"{key} = {toml_value(value)}")
    for table, keys in tables.items():
        lines.append(f"[tables.{toml_value(table)}]")
        lines.append(f"keys = {toml_value(list(keys))}")
    path.write_text("\n".join(lines) + "\n")
    return path


class ListenerThread:
    """The real Runner in a thread of the test process: for behaviour tests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopper = Stopper()
        self.runner, self.sink = build_listener(settings, self.stopper)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)

    @classmethod
    def from_file(cls, path: Path) -> ListenerThread:
        return cls(load_settings(path))

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:
            self.error = exc
            raise

    def start(self) -> ListenerThread:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self.stopper.stop()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "listener did not stop"
        self.sink.close()
        self.stopper.close()
        if self.error is not None:
            raise self.error

    def alive(self) -> bool:
        return self._thread.is_alive()


class ListenerProcess:
    """`python -m cdc_invalidator run` as a child process: for signals and SIGKILL."""

    def __init__(self, config: Path, log_path: Path, env: Mapping[str, str] | None = None):
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ListenerProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cdc_invalidator", "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**self.env, "CDC_INVALIDATOR_LOG_FORMAT": "json"},
        )
        wait_until(lambda: self.logged("listener_started"), what="listener_started log line")
        return self

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                out.append({"event": "<non-json>", "raw": raw})
        return out

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 20.0) -> int:
        assert self.process is not None
        code = self.process.wait(timeout_s)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if hasattr(self, "_log"):
            self._log.close()


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a separate process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "cdc_invalidator", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )
