"""Throwaway PostgreSQL and Redis servers on free loopback ports.

Used by `cdc-invalidator demo`, the test suite and the benchmark. Binaries are found on
the machine (PostgreSQL's bindir, redis-server on PATH). PostgreSQL refuses to run as
root, so when we are root its commands run as the `postgres` user.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import redis

PG_USER_WHEN_ROOT = "postgres"


class ServerError(Exception):
    """A server could not be found or started; the message says what to install."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_pg_bindir() -> Path:
    candidates: list[str] = []
    if env := os.environ.get("CDC_INVALIDATOR_PG_BINDIR"):
        candidates.append(env)
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


def _find_binary(name: str, package: str) -> str:
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
    )
    if not found:
        raise ServerError(f"{name} not found: install the {package} package")
    return found


def find_redis_server() -> str:
    return _find_binary("redis-server", "redis-server")


def find_redis_cli() -> str:
    return _find_binary("redis-cli", "redis-tools")


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


class _Server:
    """Started on entering a `with`, stopped and removed on leaving it."""

    def start(self) -> None:
        raise NotImplementedError

    def destroy(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()


class PostgresServer(_Server):
    """A cluster in its own directory: initdb, then start/stop/restart/kill."""

    def __init__(self, directory: Path, port: int, bindir: Path, user: str | None) -> None:
        self.directory = directory
        self.datadir = directory / "data"
        self.logfile = directory / "postgres.log"
        self.port = port
        self.bindir = bindir
        self.user = user

    @classmethod
    def create(cls, settings: dict[str, str] | None = None, port: int | None = None) -> Self:
        bindir = find_pg_bindir()
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

    def stop(self, mode: str = "fast") -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"])

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

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


@dataclass(frozen=True)
class RedisTls:
    """Serve TLS only (`--port 0`), with these PEM files; `auth_clients` is redis'
    `tls-auth-clients`: must ("yes"), may ("optional") or need not ("no") clients show
    a certificate signed by the CA."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    auth_clients: Literal["yes", "optional", "no"] = "optional"

    def args(self, port: int) -> list[str]:
        return [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(self.cert_file),
            "--tls-key-file",
            str(self.key_file),
            "--tls-ca-cert-file",
            str(self.ca_file),
            "--tls-auth-clients",
            self.auth_clients,
        ]

    def client_kwargs(self) -> dict[str, Any]:
        # The server's certificate doubles as our client certificate (same CA).
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca_file),
            "ssl_certfile": str(self.cert_file),
            "ssl_keyfile": str(self.key_file),
        }


class RedisServer(_Server):
    """A redis-server process with its own directory (for its dump.rdb).

    `args` are appended to the command line (`--replicaof`, `--user`, ...); `tls` makes
    it serve TLS only; `sentinel_conf` runs it as a sentinel with that configuration
    (written to its directory, which Sentinel rewrites as it learns)."""

    def __init__(  # noqa: PLR0913 - the options past the first few are keyword-only
        self,
        directory: Path,
        port: int,
        binary: str,
        args: list[str],
        *,
        tls: RedisTls | None = None,
        sentinel_conf: str | None = None,
    ) -> None:
        self.directory = directory
        self.port = port
        self.binary = binary
        self.args = args
        self.tls = tls
        self.sentinel_conf = sentinel_conf
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(
        cls,
        args: list[str] | None = None,
        port: int | None = None,
        tls: RedisTls | None = None,
    ) -> Self:
        directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-redis-"))
        return cls(directory, port or free_port(), find_redis_server(), args or [], tls=tls)

    @classmethod
    def create_sentinel(cls, master_port: int, master_name: str = "mymaster") -> Self:
        """A sentinel watching 127.0.0.1:master_port as `master_name`, quorum 1, quick
        to call it down (1 s) and to give up on a failover (5 s)."""
        directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-sentinel-"))
        conf = (
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 5000\n"
        )
        return cls(directory, free_port(), find_redis_server(), [], sentinel_conf=conf)

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        tls = self.tls.client_kwargs() if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **{**tls, **kwargs})

    def start(self, timeout_s: float = 20.0) -> None:
        head = [self.binary]
        if self.sentinel_conf is not None:
            conf = self.directory / "sentinel.conf"
            if not conf.exists():  # a restart keeps what the sentinel learnt
                conf.write_text(self.sentinel_conf)
            head += [str(conf), "--sentinel"]
        port_args = self.tls.args(self.port) if self.tls else ["--port", str(self.port)]
        cmd = [
            *head,
            *port_args,
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
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    raise ServerError(f"redis-server exited: {log}")
                try:
                    client.ping()
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise ServerError("redis-server did not answer PING in time") from None
                    time.sleep(0.02)
                else:
                    return
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

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisClusterServer(_Server):
    """A Redis Cluster of `masters` redis-server processes (no replicas), each a
    RedisServer with cluster mode on; `redis-cli --cluster create` assigns the slots."""

    def __init__(self, nodes: list[RedisServer], cli: str) -> None:
        self.nodes = nodes
        self.cli = cli

    @classmethod
    def create(cls, masters: int = 3, node_timeout_ms: int = 2000) -> Self:
        cli = find_redis_cli()
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",  # in the node's own --dir
            "--cluster-node-timeout",
            str(node_timeout_ms),
        ]
        # The bus port defaults to port + 10000, which a free port above 55535 cannot
        # have: give each node a free one of its own.
        nodes = [
            RedisServer.create([*args, "--cluster-port", str(free_port())]) for _ in range(masters)
        ]
        return cls(nodes, cli)

    @property
    def url(self) -> str:
        """The first node: a client discovers the others from it."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        result = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed: {result.stdout[-2000:]}")
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node says cluster_state:ok and knows every other node."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            client = node.client()
            try:
                while True:
                    try:
                        info = client.cluster("info")
                    except redis.ConnectionError:
                        info = {}
                    if info.get("cluster_state") == "ok" and int(
                        info.get("cluster_known_nodes", 0)
                    ) == len(self.nodes):
                        break
                    if time.monotonic() > deadline:
                        raise ServerError(f"cluster not ok on port {node.port}: {info}")
                    time.sleep(0.02)
            finally:
                client.close()

    def restart_node(self, index: int) -> None:
        """Stop one node and start it again (same port, same nodes.conf: same slots)."""
        self.nodes[index].restart()
        self.wait_ok()

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()
