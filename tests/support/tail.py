"""`cdc-invalidator tail` as the tests run it: a child process, its output in files, and
who subscribes to the channel."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import redis

from cdc_invalidator.tools.tail_message import CHANNEL_PREFIX
from tests.support import forks
from tests.support.env import Env
from tests.support.waits import wait_until

# One line of tail's output: a change, its keys, and its commit-to-delete time.
LINE = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<table>\S+) (?P<op>[A-Z]+) "
    r"(?P<keys>.+?) commit→delete (?P<ms>\d+) ms \((?P<txn>xid \d+[^)]*)\)$"
)


class Tail:
    """`cdc-invalidator tail` as a child process, its output in files."""

    def __init__(
        self, config: Path, tmp_path: Path, *args: str, ignoring_sigint: bool = False
    ) -> None:
        self.out_path, self.err_path = tmp_path / "tail.out", tmp_path / "tail.err"
        command = [sys.executable, "-m", "cdc_invalidator", "tail", "--config", str(config)]
        # Started as a shell's background job is: SIGINT ignored, which exec passes on.
        prefix = ["sh", "-c", "trap '' INT; exec \"$@\"", "sh"] if ignoring_sigint else []
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.process = forks.start(
                [*prefix, *command, *args],
                stdout=out.fileno(),
                stderr=err.fileno(),
                env=dict(os.environ),
            )

    def lines(self) -> list[str]:
        return self.out_path.read_text().splitlines()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(20)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class StartedTails:
    """Starts `cdc-invalidator tail` processes (the `started_tail` fixture): each call
    returns once the tail has subscribed; kill() kills those left running."""

    def __init__(self) -> None:
        self._started: list[Tail] = []

    def __call__(self, env: Env, config: Path, *args: str) -> Tail:
        tail = Tail(config, env.tmp_path, *args)
        self._started.append(tail)
        with env.redis() as r:
            wait_until(lambda: subscribers(r, channel_of(env)) == 1, what="tail subscribed")
        return tail

    def kill(self) -> None:
        for tail in self._started:
            tail.kill()


def subscribers(r: redis.Redis, channel: str) -> int:
    return int(r.pubsub_numsub(channel)[0][1])


def channel_of(env: Env) -> str:
    return CHANNEL_PREFIX + env.dsn.rsplit("/", 1)[1].split("?")[0]
