"""The listener and the CLI as tests run them: in a thread of the test process, or as
child processes a user (or an operator's signals) would deal with."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdc_invalidator.cli import main
from cdc_invalidator.listener import build_listener
from cdc_invalidator.settings import Settings, load_settings
from cdc_invalidator.shutdown import Stopper
from tests.support import forks
from tests.support.waits import wait_until

if TYPE_CHECKING:  # a fixture's type only: `python -m tests.chaos` imports this outside pytest
    import pytest


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


@contextmanager
def listening(config: Path) -> Iterator[ListenerThread]:
    listener = ListenerThread.from_file(config).start()
    try:
        yield listener
    finally:
        listener.stop()


class ListenerProcess:
    """`python -m cdc_invalidator run` as a child process: for signals and SIGKILL.

    `prefix` goes before the command (`ip netns exec NAME`: on another host); the
    process then has the same pid, since `ip netns exec` replaces itself with it.
    `command` is what runs after the interpreter: the CLI, or a test's mutant of it."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        command: Sequence[str] = ("-m", "cdc_invalidator"),
    ):
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.prefix = list(prefix)
        self.command = list(command)
        self.process: forks.Process | None = None

    def start(self) -> ListenerProcess:
        self._log = self.log_path.open("ab")
        self.process = forks.start(
            [*self.prefix, sys.executable, *self.command, "run", "--config", str(self.config)],
            stdout=self._log.fileno(),
            stderr=self._log.fileno(),
            env={**self.env, "CDC_INVALIDATOR_LOG_FORMAT": "json"},
        )
        try:
            wait_until(lambda: self.logged("listener_started"), what="listener_started log line")
        except BaseException:
            # Not left running into the worker's next tests (most callers start it
            # before the try that would stop it).
            self.kill()
            raise
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


def cli(*args: str | Path) -> int:
    """The CLI in-process: its exit code; its output goes to the test's capture."""
    return main([str(a) for a in args])


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`check` in-process: its exit code, and its stdout and stderr alone."""
    capsys.readouterr()
    code = cli("check", "--config", config)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a separate process, output captured."""
    argv = [sys.executable, "-m", "cdc_invalidator", *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = forks.start(
            argv, env={**os.environ, **(env or {})}, stdout=out.fileno(), stderr=err.fileno()
        )
        try:
            code = process.wait(60)
        except BaseException:  # (a timeout, or the test's own: not left running)
            process.kill()
            process.wait(10)
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, code, _text(out.read()), _text(err.read()))


def _text(output: bytes) -> str:
    """As subprocess.run(text=True) decodes it: the locale's encoding, universal newlines."""
    return io.TextIOWrapper(io.BytesIO(output)).read()


# The `spawn` fixture: start `cdc-invalidator run` processes (config, environment).
Spawn = Callable[..., ListenerProcess]
