"""The tests' fork server (tests/support/forks.py): a command forked from it is the CLI as
an exec of `python -m cdc_invalidator` runs it, and what would start otherwise is exec'd."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import forks
from tests.support.env import Env
from tests.support.listener import ListenerProcess, run_cli, stop_listener
from tests.support.waits import wait_until

CLI = [sys.executable, "-m", "cdc_invalidator"]


@pytest.fixture(autouse=True)
def forker() -> Iterator[forks.Forker]:
    """On, whatever CDC_TEST_FORKS says: these are its tests."""
    with forks.on() as server:
        yield server


def _exec(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def test_a_forked_command_says_and_exits_as_the_exec_d_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output, exit status and the working directory (a relative --config), forked and
    exec'd: a bad file, a missing one, --version."""
    (tmp_path / "bad.toml").write_text('database_url = "postgresql://u:hunter2@h/db"\n[tables\n')
    monkeypatch.chdir(tmp_path)
    for args in (
        ("check", "--config", "bad.toml"),
        ("check", "--config", "missing.toml"),
        ("--version",),
    ):
        forked, execd = run_cli(*args), _exec(*args, cwd=tmp_path)
        assert (forked.returncode, forked.stdout, forked.stderr) == (
            execd.returncode,
            execd.stdout,
            execd.stderr,
        ), args
        assert forked.returncode != 0 or args == ("--version",)
    assert "bad.toml" in run_cli("check", "--config", "bad.toml").stderr


def test_only_the_cli_with_the_same_interpreter_settings_is_forked(tmp_path: Path) -> None:
    with (tmp_path / "out").open("wb") as out:
        fd = out.fileno()
        same = forks.start([*CLI, "--version"], env=dict(os.environ), stdout=fd, stderr=fd)
        other = forks.start(
            [*CLI, "--version"], env={**os.environ, "PYTHONHASHSEED": "1"}, stdout=fd, stderr=fd
        )
        script = forks.start([sys.executable, "-c", "pass"], env=os.environ, stdout=fd, stderr=fd)
        assert [same.wait(60), other.wait(60), script.wait(60)] == [0, 0, 0]
    assert isinstance(same, forks.ForkedProcess)
    assert isinstance(other, subprocess.Popen)
    assert isinstance(script, subprocess.Popen)


def test_a_forked_listener_is_stopped_and_killed_as_a_process(env: Env, tmp_path: Path) -> None:
    """Its own pid for signals, its environment (JSON logs), and its exit status: 0 after
    SIGTERM, -9 after SIGKILL, as Popen says them."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    config = env.config({"public.users": ["user:{id}"]})
    assert run_cli("install", "--config", str(config)).returncode == 0
    first = ListenerProcess(config, tmp_path / "first.log").start()  # (JSON lines, or no start)
    assert isinstance(first.process, forks.ForkedProcess)
    assert first.process.pid != os.getpid()
    stop_listener(first)
    second = ListenerProcess(config, tmp_path / "second.log").start()
    assert second.process is not None
    assert second.process.poll() is None
    second.process.send_signal(signal.SIGKILL)
    wait_until(lambda: second.process is not None and second.process.poll() is not None)
    assert second.wait() == -signal.SIGKILL


def test_a_request_cut_short_leaves_the_server_serving(forker: forks.Forker) -> None:
    """A test killed halfway through its request (connected, then gone; or its request
    sent and gone before the pid came back) is the server's to shrug off: it took the
    server down, and every later command of the run with it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.connect(forker.address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone, open(os.devnull, "wb") as null:
        body = json.dumps({"args": ["--version"], "env": dict(os.environ), "cwd": os.getcwd()})
        gone.connect(forker.address)
        fds = array.array("i", [0, null.fileno(), null.fileno()])
        gone.sendmsg(
            [forks._HEADER.pack(len(body)) + body.encode()],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
        )
    done = run_cli("--version")
    assert (done.returncode, done.stdout.startswith("cdc-invalidator ")) == (0, True)
    assert forker.process.poll() is None
