"""Redis Cluster helpers shared by the cluster tests: a cluster of a test's own, the
test environment pointed at one node, which node serves a key, and a slot moved by
hand as `redis-cli --cluster reshard` does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.support.env import Env, Servers, make_env
from tests.support.evidence import unavailable
from tests.support.servers import RedisClusterServer, RedisServer, ServerError


def new_cluster() -> RedisClusterServer:
    try:
        return RedisClusterServer.create()
    except ServerError as exc:
        unavailable(f"no Redis Cluster: {exc}")


def cluster_env(
    servers: Servers, c: RedisClusterServer, tmp_path: Path, capture: str
) -> Iterator[Env]:
    for node in c.nodes:
        client = node.client()
        client.flushall()
        client.close()
    # The second node: any node will do, the others are discovered from it.
    on_cluster = Servers(servers.pg_dsn, c.nodes[1].url, servers.pg, c.nodes[1])
    yield from make_env(on_cluster, tmp_path, capture=capture)


def node_of(c: RedisClusterServer, rc: RedisCluster, key: str) -> RedisServer:
    port = rc.nodes_manager.get_node_from_slot(key_slot(key.encode())).port
    return next(node for node in c.nodes if node.port == port)


def cmd(node: RedisServer, *args: object) -> object:
    client = node.client()
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def myid(node: RedisServer) -> str:
    raw = cmd(node, "CLUSTER", "MYID")
    assert isinstance(raw, bytes)
    return raw.decode()


class Migration:
    """Move one slot from a node to another by hand, as `redis-cli --cluster reshard`
    does: IMPORTING on the target, MIGRATING on the source, MIGRATE the keys, then
    SETSLOT NODE everywhere."""

    def __init__(self, c: RedisClusterServer, slot: int, src: RedisServer, dst: RedisServer):
        self.c, self.slot, self.src, self.dst = c, slot, src, dst
        self.src_id = myid(src)
        self.dst_id = myid(dst)

    def begin(self) -> None:
        cmd(self.dst, "CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.src_id)
        cmd(self.src, "CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.dst_id)

    def move_keys(self) -> None:
        keys = cmd(self.src, "CLUSTER", "GETKEYSINSLOT", self.slot, 1000)
        assert isinstance(keys, list)
        if keys:
            cmd(self.src, "MIGRATE", "127.0.0.1", self.dst.port, "", 0, 5000, "KEYS", *keys)

    def finish(self) -> None:
        for node in (self.dst, self.src, *self.c.nodes):
            cmd(node, "CLUSTER", "SETSLOT", self.slot, "NODE", self.dst_id)
        self.c.wait_ok()
