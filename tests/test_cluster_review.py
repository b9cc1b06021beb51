"""Redis Cluster, from a review: a slot moved away and back during a sweep; a
connection with unread UNLINK replies after an error between writing and reading.

Each test starts a cluster of its own (it moves slots or changes ACLs). Every wait is
on an event or on the servers, never on a clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from cdc_invalidator.sink import ClusterSink, connect_sink
from cdc_invalidator.sink.cluster_sink import ClusterChanging
from tests.support.evidence import unavailable
from tests.support.servers import RedisClusterServer, RedisServer, ServerError
from tests.test_cluster import Migration, node_of


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServer]:
    try:
        c = RedisClusterServer.create()
    except ServerError as exc:
        unavailable(f"no Redis Cluster: {exc}")
    with c:
        yield c


def _sink(c: RedisClusterServer, node: RedisServer) -> ClusterSink:
    sink = connect_sink(node.url)
    assert isinstance(sink, ClusterSink)
    return sink


def test_a_slot_moved_away_and_back_during_a_sweep_fails_it(
    own_cluster: RedisClusterServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key's slot goes A -> B once B's pass is over and before A's begins, and back
    to A once A's is over: neither pass sees the key, and the slots end where they
    began. The layouts compared equal and the sweep completed with the key left (a
    review); a node's config epoch, bumped by its import, now tells."""
    sink = _sink(own_cluster, own_cluster.nodes[0])
    stale = "user:42"
    sink.client.set(stale, "stale")
    a = node_of(own_cluster, sink.client, stale)
    b = next(n for n in own_cluster.nodes if n is not a)
    slot = key_slot(stale.encode())
    b_done = threading.Event()
    original = ClusterSink._sweep_node

    def pass_of(self: ClusterSink, client: redis.Redis, *args: Any) -> int:
        port = client.connection_pool.connection_kwargs["port"]
        if port == b.port:
            try:
                return original(self, client, *args)
            finally:
                b_done.set()
        if port != a.port:
            return original(self, client, *args)
        assert b_done.wait(30)
        away = Migration(own_cluster, slot, a, b)
        away.begin()
        away.move_keys()
        away.finish()
        try:
            return original(self, client, *args)
        finally:
            back = Migration(own_cluster, slot, b, a)
            back.begin()
            back.move_keys()
            back.finish()

    monkeypatch.setattr(ClusterSink, "_sweep_node", pass_of)
    with pytest.raises(ClusterChanging, match="config epoch"):
        sink.sweep(["user:*"])
    monkeypatch.setattr(ClusterSink, "_sweep_node", original)
    assert sink.client.get(stale) == b"stale"  # (where the retry finds it)
    assert sink.sweep(["user:*"]) == 1
    assert sink.client.exists(stale) == 0
    sink.close()
