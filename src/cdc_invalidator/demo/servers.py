"""Throwaway PostgreSQL and Redis servers on free loopback ports, for `cdc-invalidator demo`.

Only what the demo needs: a PostgreSQL cluster and a plain Redis, started and stopped,
then removed. The test rig (tests/support/servers.py) builds its restarts, TLS, Sentinel
and Redis Cluster on these classes.

Binaries are found on the machine (PostgreSQL's bindir, redis-server on PATH). PostgreSQL
refuses to run as root, so when we are root its commands run as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import redis

PG_USER_WHEN_ROOT = "postgres"


class ServerError(Exception):
    """A server could not be found or started; the message says what to install."""


class PortTaken(ServerError):
    """Another process listened on the port free_port() gave (it is free only until
    somebody binds it: another test worker, another program)."""


# A server's first start on a port another process took moves to a new free port, this
# many times; a restart keeps its port (its clients and configuration name it).
PORT_ATTEMPTS = 5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_pg_bindir() -> Path:
    if env := os.environ.get("CDC_INVALIDATOR_PG_BINDIR"):
        # Named on purpose (the tests' --pg, a developer's choice): never another one
        # found instead, which would run on a version nobody asked for.
        if not (Path(env) / "initdb").exists():
            raise ServerError(f"CDC_INVALIDATOR_PG_BINDIR={env}: there is no initdb there")
        return Path(env)
    candidates: list[str] = []
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    if initdb := shutil.which("initdb"):
        candidates.append(str(Path(initdb).resolve().parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise ServerError(
        "no PostgreSQL server binaries found (initdb, pg_ctl): install the postgresql "
        "package or set CDC_INVALIDATOR_PG_BINDIR"
    )


def find_binary(name: str, package: str) -> str:
    """`name` on PATH (or in /usr/bin); the error names the package to install."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
    )
    if not found:
        raise ServerError(f"{name} not found: install the {package} package")
    return found


def find_redis_server() -> str:
    return find_binary("redis-server", "redis-server")


def _pg_user() -> str | None:
    """The user PostgreSQL must run as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER_WHEN_ROOT)
    except KeyError:
        raise ServerError(
            "running as root and there is no 'postgres' user to run PostgreSQL as"
        ) from None
    return PG_USER_WHEN_ROOT


class Server:
    """Started on entering a `with`, stopped and removed on leaving it."""

    port: int
    started = False  # once: later starts are restarts, on the same port

    def _start_on_a_free_port(self, start_once: Callable[[], None]) -> None:
        """start_once(), moved to a new free port while its port is taken, on the first
        start only."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                start_once()
            except PortTaken:
                if self.started or attempt == PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()
                self._port_moved()
            else:
                self.started = True
                return

    def _port_moved(self) -> None:
        """Tell the server's own configuration about a new self.port (if it has one)."""

    def start(self) -> None:
        raise NotImplementedError

    def destroy(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()


class PostgresServer(Server):
    """A cluster in its own directory: initdb, then start/stop."""

    def __init__(self, directory: Path, port: int, bindir: Path, user: str | None) -> None:
        self.directory = directory
        self.datadir = directory / "data"
        self.logfile = directory / "postgres.log"
        self.port = port
        self.bindir = bindir
        self.user = user

    @classmethod
    def create(
        cls,
        settings: dict[str, str] | None = None,
        port: int | None = None,
        bindir: Path | None = None,
    ) -> Self:
        """`bindir`: the PostgreSQL programs to run (default: find_pg_bindir())."""
        bindir = bindir or find_pg_bindir()
        user = _pg_user()
        # Not under a 0700 pytest tmp dir: the postgres user must be able to reach it.
        directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-pg-"))
        if user:
            shutil.chown(directory, user, user)
        server = cls(directory, port or free_port(), bindir, user)
        try:
            server._init(settings)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return server

    def _init(self, settings: dict[str, str] | None) -> None:
        self._initdb()
        self._configure(settings)

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )

    def _configure(self, settings: dict[str, str] | None) -> None:
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "wal_level": "logical",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "max_connections": "100",
            "shared_buffers": "128MB",
            **(settings or {}),
        }
        with (self.datadir / "postgresql.auto.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(cmd, user=self.user, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ServerError(f"{' '.join(cmd[:2])} failed: {result.stderr.strip()[-2000:]}")

    def start(self) -> None:
        self._start_on_a_free_port(self._start_once)

    def _port_moved(self) -> None:
        # The last setting of a name in the file wins.
        with (self.datadir / "postgresql.auto.conf").open("a") as f:
            f.write(f"port = {self.port}\n")

    def _start_once(self) -> None:
        logged = self.logfile.stat().st_size if self.logfile.exists() else 0
        try:
            self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            )
        except ServerError as exc:
            with contextlib.suppress(OSError), self.logfile.open(errors="replace") as log:
                log.seek(logged)
                if "Address already in use" in log.read():
                    raise PortTaken(f"port {self.port} is taken: {exc}") from None
            raise

    def stop(self, mode: str = "fast") -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        result = subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status"],
            user=self.user,
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(ServerError):
                self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisServer(Server):
    """A redis-server process with its own directory (for its dump.rdb); `args` are
    appended to the command line (`--notify-keyspace-events`, `--replicaof`, ...)."""

    def __init__(self, directory: Path, port: int, binary: str, args: list[str]) -> None:
        self.directory = directory
        self.port = port
        self.binary = binary
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, args: list[str] | None = None, port: int | None = None) -> Self:
        directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-redis-"))
        return cls(directory, port or free_port(), find_redis_server(), args or [])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def _head(self) -> list[str]:
        """The command line before the options (a subclass adds a configuration file)."""
        return [self.binary]

    def _port_args(self) -> list[str]:
        """Where it listens (a subclass may serve TLS there instead)."""
        return ["--port", str(self.port)]

    def start(self, timeout_s: float = 20.0) -> None:
        self._start_on_a_free_port(lambda: self._start_once(timeout_s))

    def _start_once(self, timeout_s: float) -> None:
        cmd = [
            *self._head(),
            *self._port_args(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            *self.args,
        ]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    self.process = None
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    if "Address already in use" in log:
                        raise PortTaken(f"port {self.port} is taken: {log}")
                    raise ServerError(f"redis-server exited: {log}")
                try:
                    client.ping()
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise ServerError("redis-server did not answer PING in time") from None
                    time.sleep(0.02)
                    continue
                # Ours, not a server another process started on the same port (ours then
                # exits, failing to bind it). A user not allowed INFO cannot tell: ours.
                try:
                    pid = client.info("server").get("process_id")
                except redis.ResponseError:
                    return
                if pid == self.process.pid:
                    return
                self.kill()
                raise PortTaken(f"port {self.port} is taken by another redis-server (pid {pid})")
        finally:
            client.close()

    def stop(self) -> None:
        """Shut down without saving (what an operator's restart without persistence does)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: nothing is saved on the way down."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(20)
        self.process = None

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
