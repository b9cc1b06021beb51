"""`python -m cdc_invalidator ...` as the tests start it, without paying its start each time.

Every process start imports the package and its libraries (psycopg, redis-py, pydantic):
0.6-0.8 s of CPU on the 2-core CI machines, for some 560 listeners and one-shot commands
in one run of the suite, all on the tests' critical path. A fork server, started once per
test process, imports them once; each command is then a fork of it, run as `-m` runs it
(runpy, `__main__`, sys.argv), with the test's stdin, stdout, stderr, environment and
working directory, its own pid, and its exit status (a signal's as Popen says it: -N).

What keeps exec's semantics instead (`start()` falls back to Popen): a command that is
not the CLI (a test's mutant, a prefix such as `ip netns exec`), an environment that
changes what the interpreter or its libraries read once at start (PYTHON*, locale,
PSYCOPG_IMPL), and anything outside pytest (`make chaos`, bench). CDC_TEST_FORKS=0 turns
it off for a run. The server is single-threaded (a fork takes only the forking thread),
holds no connection of any kind, and never touches a signal's disposition, so what a
child inherits is what an exec'd interpreter would have set up from the same parent.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import runpy
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

CLI = ("-m", "cdc_invalidator")
# What is read once at start, by the interpreter, the locale, the dynamic loader, glibc,
# OpenSSL, or at import by psycopg, prometheus_client, structlog: a fork would carry the
# server's value.
_READ_AT_START = (
    "PYTHON",
    "LC_",
    "LANG",
    "TZ",
    "LD_",
    "GLIBC_",
    "MALLOC_",
    "OPENSSL_",
    "PSYCOPG",
    "PROMETHEUS_",
    "NO_COLOR",
    "FORCE_COLOR",
)
_HEADER = struct.Struct("!I")


@dataclass
class Forker:
    """This test process's fork server: one child process, commands forked from it."""

    process: subprocess.Popen[bytes]
    address: str
    env: dict[str, str]  # its own, which its forks start from

    @classmethod
    def start(cls) -> Forker:
        # An abstract socket: no path to clean up or to outgrow (108 bytes).
        name = f"cdc-invalidator-tests-forks-{os.getpid()}-{time.monotonic_ns()}"
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.forks", name],
            cwd=Path(__file__).parents[2],  # (where `tests` is a package)
            stdin=subprocess.PIPE,  # its end of life: the server exits at EOF
            stdout=subprocess.DEVNULL,
        )
        return cls(process, "\0" + name, dict(os.environ))

    def ready(self, timeout_s: float = 30.0) -> bool:
        """Whether it accepts commands, waiting for its imports once."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.address)
                except (ConnectionRefusedError, FileNotFoundError):
                    time.sleep(0.01)
                    continue
                probe.sendall(_HEADER.pack(0))  # an empty request: a ping
                return probe.recv(1) == b"\n"
        return False

    def fork(
        self, argv: Sequence[str], env: Mapping[str, str], fds: tuple[int, int, int]
    ) -> ForkedProcess:
        # (built first: nothing half sent)
        request = json.dumps({"args": list(argv[3:]), "env": dict(env), "cwd": os.getcwd()})
        body = request.encode()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.address)
            conn.sendmsg(
                [_HEADER.pack(len(body)) + body],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
            )
            return ForkedProcess(list(argv), conn)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class Process(Protocol):
    """What the tests use of a child process: a Popen's, or a ForkedProcess's."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, signum: int) -> None: ...
    def kill(self) -> None: ...


class ForkedProcess:
    """A Popen's ways, for a command the fork server started. The server reaps it and
    sends its exit status on the connection that asked for it; signals go through a
    pidfd the server passed with its pid, so they reach it (and only it) even were the
    server gone."""

    def __init__(self, args: list[str], conn: socket.socket) -> None:
        self.args = args
        self.returncode: int | None = None
        self._conn, self._buffer = conn, b""
        self._pidfd: int | None = None
        self.pid = int(self._line(30.0))
        if self._pidfd is None:
            raise RuntimeError(f"the tests' fork server sent no pidfd for pid {self.pid}")

    def _line(self, timeout: float | None) -> bytes:
        """The server's next line; TimeoutError when none came within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                raise TimeoutError
            more, ancillary, _, _ = self._conn.recvmsg(64, socket.CMSG_SPACE(4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self._pidfd = int.from_bytes(payload[:4], sys.byteorder)
            if not more:
                raise _ServerGone(f"the tests' fork server went away: pid {self.pid} ({self.args})")
            self._buffer += more
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._ended(int(self._line(0.0)))
            except TimeoutError:
                return None
            except _ServerGone:
                if not self._exited(0.0):
                    return None  # (still running: it can be killed)
                raise
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._ended(int(self._line(timeout)))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
            except _ServerGone:
                if not self._exited(timeout):
                    raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
                raise  # ended, its exit status lost with the server
        assert self.returncode is not None
        return self.returncode

    def _exited(self, timeout: float | None) -> bool:
        """Whether it has ended, by its pidfd (for when the server is gone)."""
        return self._pidfd is None or bool(select.select([self._pidfd], [], [], timeout)[0])

    def _ended(self, returncode: int) -> None:
        self.returncode = returncode
        self._conn.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):  # exited, its status on its way
                signal.pidfd_send_signal(self._pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _ServerGone(RuntimeError):
    pass


_wanted = False  # set by enable(): pytest_configure
_forker: Forker | None = None  # this test process's, started by its first command


def enable() -> None:
    """Fork the CLI's commands from now on (pytest_configure), unless CDC_TEST_FORKS=0.
    The server starts with the first of them: not in a process that runs none, such as
    xdist's controller."""
    global _wanted  # noqa: PLW0603 - one server per test process, for the whole run
    _wanted = os.environ.get("CDC_TEST_FORKS", "1") != "0"


def disable() -> None:
    global _wanted, _forker  # noqa: PLW0603 - see enable()
    _wanted = False
    if _forker is not None:
        _forker.close()
        _forker = None


@contextlib.contextmanager
def on() -> Iterator[Forker]:
    """Forks on for a while, whatever CDC_TEST_FORKS says: the server
    (tests/test_forks.py)."""
    global _wanted
    was, _wanted = _wanted, True
    try:
        forker = _server()
        assert forker is not None, "the tests' fork server did not start"
        yield forker
    finally:
        if not was:
            disable()


def _server() -> Forker | None:
    global _wanted, _forker  # noqa: PLW0603 - see enable()
    if _forker is not None and _forker.process.poll() is not None:
        warnings.warn(
            f"the tests' fork server exited ({_forker.process.returncode}): the CLI is "
            "exec'd from now on in this test process",
            stacklevel=3,
        )
        _forker, _wanted = None, False
    if _forker is None and _wanted:
        forker = Forker.start()
        if forker.ready():
            _forker = forker
        else:  # every command exec'd, as before, rather than a run lost to the harness
            forker.close()
            _wanted = False
    return _forker


def _starts_alike(env: Mapping[str, str], forker: Forker) -> bool:
    """Whether an interpreter started with `env` sets itself up as the server did."""
    changed = set(env.items()) ^ set(forker.env.items())
    return not any(key.startswith(_READ_AT_START) for key, _ in changed)


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: int,
    stderr: int,
    stdin: int = 0,
) -> Process:
    """Popen(argv) for the tests: forked from the server when that is the same thing, else
    exec'd. stdin, stdout, stderr: file descriptors."""
    cli = tuple(argv[:3]) == (sys.executable, *CLI)
    if cli and (forker := _server()) is not None and _starts_alike(env, forker):
        return forker.fork(argv, env, (stdin, stdout, stderr))
    return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=dict(env))


# The server.


@dataclass
class _Request:
    args: list[str]
    env: dict[str, str]
    cwd: str
    fds: list[int]


def _receive(conn: socket.socket) -> _Request | None:
    """A request and its three descriptors; None for a ping."""
    fds = array.array("i")
    conn.settimeout(10.0)  # (a test killed halfway through its request)
    data, ancillary, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("request cut short")
        data += more
    (size,) = _HEADER.unpack_from(data)
    if size == 0:
        return None
    body: dict[str, Any] = json.loads(data[_HEADER.size :])
    return _Request(body["args"], body["env"], body["cwd"], list(fds))


def _serve(address: str) -> _Request | None:
    """Accept requests until stdin ends (None: the server exits); in a forked child,
    return its request."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd: (pid, its requester)
    while True:
        for key, _ in selector.select():
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 1 << 12):
                    return None
            elif key.data == "accept":
                conn, _ = listener.accept()
                try:
                    request = _receive(conn)
                except (OSError, ValueError, KeyError) as exc:  # its test gone, or a bug here
                    print(f"tests' fork server: a request refused: {exc!r}", file=sys.stderr)
                    conn.close()
                    continue
                if request is None:
                    with contextlib.suppress(OSError):  # (a ping; its sender gone)
                        conn.sendall(b"\n")
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    conn.close()
                    for pidfd, (_, requester) in children.items():
                        os.close(pidfd)
                        requester.close()
                    return request
                for fd in request.fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, conn)
                selector.register(pidfd, selectors.EVENT_READ, "exit")
                try:
                    conn.sendmsg(
                        [b"%d\n" % pid],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))],
                    )
                except OSError:  # its test gone: nobody would stop it
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                pidfd = key.fd
                selector.unregister(pidfd)
                pid, conn = children.pop(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):  # its test gone
                    conn.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))
                conn.close()


def _become(request: _Request) -> None:
    """The forked child: the command's descriptors, environment and directory, then the
    CLI as `python -m` runs it (its SystemExit ends this interpreter as it would)."""
    for target, fd in zip((0, 1, 2), request.fds, strict=True):
        os.dup2(fd, target)
    for fd in set(request.fds):
        if fd > 2:
            os.close(fd)
    os.environ.clear()
    os.environ.update(request.env)
    os.chdir(request.cwd)
    sys.argv = ["-m", *request.args]  # run_module sets argv[0] to __main__.py's path
    runpy.run_module("cdc_invalidator", run_name="__main__", alter_sys=True)


def _main(address: str) -> None:
    import cdc_invalidator.cli  # noqa: F401, PLC0415 - what each fork would import again

    request = _serve(address)
    if request is not None:
        _become(request)


if __name__ == "__main__":
    _main("\0" + sys.argv[1])
