"""A Redis Cluster over TLS: three primaries serving TLS only (`--port 0`), their bus
over TLS too (`tls-cluster yes`), clients made to show a certificate (`tls-auth-clients
yes`), and the listener an ACL user (docs/redis.md's minimal ACL with the cluster's
additions) given one node's rediss:// URL.

Every wait is on an event (wait_until), never on a clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from cdc_invalidator.cli import main
from cdc_invalidator.sink import ClusterSink
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.evidence import unavailable
from tests.support.listener import listening, run_cli
from tests.support.servers import (
    RedisClusterServer,
    RedisServer,
    ServerError,
    find_redis_cli,
    free_port,
)
from tests.support.tls import Certs, make_certs
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.slow]

PASSWORD = "cluster-tls-s3cret"  # noqa: S105 - made up, never to be printed
# docs/redis.md: the minimal ACL, and what a cluster needs beyond it.
CLUSTER_ACL = [
    *("on", f">{PASSWORD}", "~*", "resetchannels", "-@all"),
    *("+unlink", "+scan", "+info", "+ping", "+client|setname"),
    *("+cluster|slots", "+cluster|nodes", "+command", "+asking"),
]
USERS = {"public.users": ["user:{id}", "user:email:{email}"]}


class TlsCluster(RedisClusterServer):
    """RedisClusterServer whose nodes serve TLS only, bus included; redis-cli is given
    the CA and a certificate."""

    certs: Certs

    @classmethod
    def create_tls(cls, certs: Certs, masters: int = 3) -> TlsCluster:
        args = [
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", "2000"),
            *("--tls-cluster", "yes", "--tls-replication", "yes"),
            *("--user", "cdc", *CLUSTER_ACL),
        ]
        nodes = [
            RedisServer.create([*args, "--cluster-port", str(free_port())], tls=certs.redis_tls())
            for _ in range(masters)
        ]
        cluster = cls(nodes, find_redis_cli(), args)
        cluster.certs = certs
        return cluster

    def _cli_args(self) -> list[str]:
        return self.certs.cli_args()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_cluster(certs: Certs) -> Iterator[TlsCluster]:
    try:
        cluster = TlsCluster.create_tls(certs)
    except ServerError as exc:
        unavailable(f"no Redis Cluster: {exc}")
    with cluster:
        yield cluster


@pytest.fixture
def rc(tls_cluster: TlsCluster, certs: Certs) -> Iterator[RedisCluster]:
    """The test's own client of the cluster (the default user, over TLS)."""
    for node in tls_cluster.nodes:
        with node.client() as client:
            client.flushall()
    port = tls_cluster.nodes[0].port
    client = RedisCluster(
        "127.0.0.1", port, decode_responses=True, **certs.redis_tls().client_kwargs()
    )
    yield client
    client.close()


def keys_per_node(cluster: TlsCluster, pattern: str) -> list[int]:
    counts = []
    for node in cluster.nodes:
        with node.client() as client:
            counts.append(sum(1 for _ in client.scan_iter(match=pattern, count=1000)))
    return counts


def cache_users(rc: RedisCluster, ids: range) -> list[str]:
    cached = {f"user:{i}": "cached" for i in ids} | {f"user:email:u{i}@x": "-" for i in ids}
    rc.mset_nonatomic(cached)
    return list(cached)


def cluster_config(env: Env, cluster: TlsCluster, certs: Certs, rows: int) -> Path:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        f"INSERT INTO users SELECT g, 'u' || g || '@x', 'n' FROM generate_series(1, {rows}) g"
    )
    config = write_config(
        env.tmp_path / "cluster-tls.toml",
        database_url=env.dsn,
        # The second node: the others are discovered from it (over TLS).
        redis_url=f"rediss://cdc:{PASSWORD}@127.0.0.1:{cluster.nodes[1].port}/0",
        redis_tls_ca_file=str(certs.ca),
        redis_tls_cert_file=str(certs.client),
        tables=USERS,
    )
    assert main(["install", "--config", str(config)]) == 0
    return config


def test_changes_delete_keys_on_every_primary_over_tls(
    env: Env, tls_cluster: TlsCluster, certs: Certs, rc: RedisCluster
) -> None:
    config = cluster_config(env, tls_cluster, certs, 60)
    changed = cache_users(rc, range(1, 61))
    bystanders = {f"other:{i}": "keep" for i in range(60)}
    rc.mset_nonatomic(bystanders)
    assert all(n > 10 for n in keys_per_node(tls_cluster, "user:*")), "keys on every primary"
    with listening(config) as listener:
        env.sql(
            "UPDATE users SET name = 'changed' WHERE id <= 30;"
            "DELETE FROM users WHERE id > 30"
        )  # fmt: skip
        wait_until(lambda: rc.exists(*changed) == 0, what="every changed row's keys")
        assert isinstance(listener.sink.sink, ClusterSink)
        # The listener's own connections, as its ACL user, on every primary: the
        # deletes reached each over TLS (no node has a plain-text port).
        for node in tls_cluster.nodes:
            with node.client(decode_responses=True) as client:
                assert client.config_get("port")["port"] == "0"
                assert any(c["user"] == "cdc" for c in client.client_list())
    assert rc.mget_nonatomic(list(bystanders)) == list(bystanders.values())
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "a Redis Cluster of 3 primaries, each reachable" in out.stdout
    assert PASSWORD not in out.stdout + out.stderr


def test_truncate_sweeps_every_primary_over_tls(
    env: Env, tls_cluster: TlsCluster, certs: Certs, rc: RedisCluster
) -> None:
    config = cluster_config(env, tls_cluster, certs, 1)
    # More than a SCAN page (scan_count 1000) on each primary: the sweep must page.
    swept = cache_users(rc, range(1, 2001))
    bystanders = {f"users:{i}": "not user:*" for i in range(100)}
    rc.mset_nonatomic(bystanders)
    assert all(n > 1000 for n in keys_per_node(tls_cluster, "user:*"))
    with listening(config):
        env.sql("TRUNCATE users")
        wait_until(lambda: keys_per_node(tls_cluster, "user:*") == [0, 0, 0], what="user:* swept")
    assert rc.exists(*swept) == 0
    assert rc.mget_nonatomic(list(bystanders)) == list(bystanders.values())
