"""Throwaway servers for the tests and the benchmark, on free loopback ports.

Built on the demo's (cdc_invalidator.demo.servers: a PostgreSQL cluster, a plain Redis),
with what only the tests and the benchmark need on top: restarts, Redis over TLS, a
Sentinel, a Redis Cluster of masters.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import redis

from cdc_invalidator.demo import servers as demo_servers
from cdc_invalidator.demo.servers import (
    ServerError,
    find_binary,
    find_pg_bindir,
    find_redis_server,
    free_port,
)

__all__ = [
    "PostgresServer",
    "RedisClusterServer",
    "RedisServer",
    "RedisTls",
    "ServerError",
    "find_pg_bindir",
    "find_redis_cli",
    "find_redis_server",
    "free_port",
]


def find_redis_cli() -> str:
    return find_binary("redis-cli", "redis-tools")


class PostgresServer(demo_servers.PostgresServer):
    """The demo's cluster, which the tests also restart and read the postmaster of.

    Its data directory is a copy of one initdb per set of programs: some hundred tests
    start a cluster of their own, and initdb took 0.3-0.6 s each (a copy, 0.03 s)."""

    def _initdb(self) -> None:
        shutil.copytree(_initdb_template(self.bindir, self.user), self.datadir, symlinks=True)
        if self.user:  # (copied as root)
            for path in [self.datadir, *self.datadir.rglob("*")]:
                shutil.chown(path, self.user, self.user)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @classmethod
    def standby_of(cls, primary: demo_servers.PostgresServer) -> PostgresServer:
        """A streaming standby of `primary` (pg_basebackup -R), started: in recovery,
        read-only, until promote()."""
        directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-pg-standby-"))
        if primary.user:
            shutil.chown(directory, primary.user, primary.user)
        standby = cls(directory, free_port(), primary.bindir, primary.user)
        try:
            standby._run(
                [
                    str(primary.bindir / "pg_basebackup"),
                    *("-D", str(standby.datadir), "-R", "--no-sync", "-X", "stream", "-c", "fast"),
                    *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
                ]
            )
            # (the primary's own settings came with the copy: the last line wins)
            with (standby.datadir / "postgresql.auto.conf").open("a") as f:
                f.write(f"port = {standby.port}\nunix_socket_directories = '{directory}'\n")
            standby.start()
        except BaseException:
            standby.destroy()
            raise
        return standby

    def promote(self) -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", "promote"])

    @property
    def pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None


# bindir -> a data directory initdb made, copied for each cluster (removed at exit).
_initdb_done: dict[Path, Path] = {}


def _initdb_template(bindir: Path, user: str | None) -> Path:
    made = _initdb_done.get(bindir)
    if made is None:
        directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-initdb-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        if user:
            shutil.chown(directory, user, user)
        blank = demo_servers.PostgresServer(directory, 0, bindir, user)
        blank._initdb()  # the same initdb, once
        made = _initdb_done[bindir] = blank.datadir
    return made


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


class RedisServer(demo_servers.RedisServer):
    """The demo's redis-server, also restartable; `tls` makes it serve TLS only;
    `sentinel_conf` runs it as a sentinel with that configuration (written to its
    directory, which Sentinel rewrites as it learns)."""

    def __init__(
        self,
        directory: Path,
        port: int,
        binary: str,
        args: list[str],
        *,
        tls: RedisTls | None = None,
        sentinel_conf: str | None = None,
    ) -> None:
        super().__init__(directory, port, binary, args)
        self.tls = tls
        self.sentinel_conf = sentinel_conf

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
        return super().client(**{**tls, **kwargs})

    def _sentinel_conf(self) -> Path:
        return self.directory / "sentinel.conf"

    def _head(self) -> list[str]:
        if self.sentinel_conf is None:
            return super()._head()
        return [*super()._head(), str(self._sentinel_conf()), "--sentinel"]

    def _port_args(self) -> list[str]:
        return self.tls.args(self.port) if self.tls else super()._port_args()

    def start(self, timeout_s: float = 20.0) -> None:
        conf = self._sentinel_conf()
        if self.sentinel_conf is not None and not conf.exists():
            conf.write_text(self.sentinel_conf)  # a restart keeps what the sentinel learnt
        super().start(timeout_s)

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisClusterServer(demo_servers.Server):
    """A Redis Cluster of `masters` redis-server processes (no replicas), each a
    RedisServer with cluster mode on; `redis-cli --cluster create` assigns the slots."""

    def __init__(self, nodes: list[RedisServer], cli: str, args: list[str]) -> None:
        self.nodes = nodes
        self.cli = cli
        self.args = args  # each node's cluster options

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
        return cls(nodes, cli, args)

    @property
    def url(self) -> str:
        """The first node: a client discovers the others from it."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        self._cluster_command(
            timeout_s,
            "create",
            *(f"127.0.0.1:{node.port}" for node in self.nodes),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        )
        self.wait_ok(timeout_s)

    def _cli_args(self) -> list[str]:
        """What redis-cli needs to reach the nodes (a subclass's TLS files)."""
        return []

    def _cluster_command(self, timeout_s: float, command: str, *args: str) -> None:
        """`redis-cli --cluster COMMAND ARGS...`; ServerError if it fails."""
        result = subprocess.run(
            [self.cli, *self._cli_args(), "--cluster", command, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"redis-cli --cluster {command} failed: {result.stdout[-2000:]}")

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

    def add_node(self, timeout_s: float = 30.0) -> RedisServer:
        """A new primary that joins the cluster owning no slots (`redis-cli --cluster
        add-node`): CLUSTER SLOTS does not list it until a slot is moved to it."""
        node = RedisServer.create([*self.args, "--cluster-port", str(free_port())])
        node.start()
        self.nodes.append(node)
        self._cluster_command(
            timeout_s, "add-node", f"127.0.0.1:{node.port}", f"127.0.0.1:{self.nodes[0].port}"
        )
        self.wait_ok(timeout_s)
        return node

    def restart_node(self, index: int) -> None:
        """Stop one node and start it again (same port, same nodes.conf: same slots)."""
        self.nodes[index].restart()
        self.wait_ok()

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()
