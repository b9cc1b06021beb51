"""Redis Cluster under change: a slot moved away and back during a sweep; a
connection with unread UNLINK replies after an error between writing and reading.

Each test starts a cluster of its own (it moves slots or changes ACLs). Every wait is
on an event or on the servers, never on a clock.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from cdc_invalidator.cli import main
from cdc_invalidator.sink import ClusterSink, connect_sink
from cdc_invalidator.sink.cluster_sink import ClusterChanging
from tests.support.cluster import Migration, cluster_env, cmd, new_cluster, node_of
from tests.support.config import write_config
from tests.support.env import Env, Servers
from tests.support.listener import ListenerProcess
from tests.support.servers import RedisClusterServer, RedisServer
from tests.support.waits import wait_until


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServer]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def own_cenv(servers: Servers, own_cluster: RedisClusterServer, tmp_path: Path) -> Iterator[Env]:
    yield from cluster_env(servers, own_cluster, tmp_path, "trigger")


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


def _key_on(sink: ClusterSink, prefix: str, node: RedisServer) -> str:
    """The first key `prefix`N whose slot `node` serves."""
    table = sink.client.nodes_manager.slots_cache
    return next(
        key
        for i in range(100_000)
        if table[key_slot((key := f"{prefix}{i}").encode())][0].port == node.port
    )


def test_replies_left_unread_by_an_error_are_never_read_for_the_next_batch(
    own_cluster: RedisClusterServer,
) -> None:
    """An UNLINK written to X, then an error other than a lost connection before its
    reply is read (connecting to Y: NOPERM for CLIENT SETNAME, a ResponseError): X's
    connection went back to its pool with the reply unread and not arrived yet (X's
    writes paused), so the pool's check for data left on it passed, and the next batch
    read that reply for its own: an UNLINK refused NOPERM was confirmed, its key left
    (a review). Any error now disconnects what was written to."""
    x, y, z = own_cluster.nodes
    for node in own_cluster.nodes:
        node_client = node.client()
        node_client.execute_command("ACL", "SETUSER", "rev", "on", ">pw", "~*", "+@all")
        node_client.close()
    x_admin, y_admin = x.client(), y.client()
    y_admin.execute_command("ACL", "SETUSER", "rev", "-client|setname")
    x_admin.execute_command("ACL", "SETUSER", "rev", "resetkeys", "~user:*")
    sink = connect_sink(z.url.replace("redis://", "redis://rev:pw@"))
    assert isinstance(sink, ClusterSink)
    first = [_key_on(sink, "user:", x), _key_on(sink, "other:", y)]
    refused = _key_on(sink, "order:", x)
    x_admin.set(refused, "cached")
    x_admin.execute_command("CLIENT", "PAUSE", 2000, "WRITE")  # (X's replies held)
    with pytest.raises(redis.exceptions.NoPermissionError, match=r"client\|setname"):
        sink.unlink(first)  # (X written to first: its slot came first)
    with pytest.raises(redis.exceptions.NoPermissionError, match="keys"):
        sink.unlink([refused])  # (it returned 1: the first batch's reply)
    assert x_admin.exists(refused) == 1
    sink.close()
    x_admin.close()
    y_admin.close()


def test_on_a_cluster_an_unlink_or_a_sweep_refused_names_its_key(
    own_cluster: RedisClusterServer,
) -> None:
    """An ACL user allowed `~user:*` on every node, the mapping making `order:*` keys
    too: the batch is not confirmed, and the error names the key (a review: NOPERM
    "one of the keys used as arguments", naming none); a sweep's, the pattern too."""
    for node in own_cluster.nodes:
        node_client = node.client()
        node_client.execute_command(
            "ACL", "SETUSER", "narrow", "on", ">pw", "~user:*", "+@all", "-flushall"
        )
        node_client.close()
    sink = connect_sink(own_cluster.url.replace("redis://", "redis://narrow:pw@"))
    assert isinstance(sink, ClusterSink)
    admin = redis.RedisCluster.from_url(own_cluster.url)
    admin.mset_nonatomic({"user:1": "a", "order:1": "b", "user:1:orders": "c"})
    with pytest.raises(redis.exceptions.NoPermissionError) as refused:
        sink.unlink(["user:1", "order:1"])
    assert "refused UNLINK of 'order:1';" in str(refused.value), refused.value
    assert admin.exists("order:1") == 1
    with pytest.raises(redis.exceptions.NoPermissionError) as refused:
        sink.sweep(["order:*", "user:*:orders"])
    assert "refused UNLINK of 'order:1' (swept for 'order:*');" in str(refused.value)
    assert admin.exists("order:1") == 1
    assert admin.exists("user:1:orders") == 0  # (the other patterns' keys: deleted)
    sink.close()
    admin.close()


def test_a_key_redirected_to_a_node_whose_acl_refuses_it_is_named(
    own_cluster: RedisClusterServer,
) -> None:
    """A slot half-moved (MIGRATING on its owner, the key not there): the owner, whose
    ACL allows the key, answers ASK, and the importing node, whose ACL does not,
    answers NOPERM to the UNLINK sent there alone: the error named no key (a note
    carried since the refusals were named). Once that node allows it, it is deleted."""
    key = "order:1"
    slot = key_slot(key.encode())
    src = _owner(own_cluster, key)
    dst = next(n for n in own_cluster.nodes if n is not src)
    for node in own_cluster.nodes:
        keys = "~user:*" if node is dst else "~*"
        cmd(node, "ACL", "SETUSER", "split", "on", ">pw", keys, "+@all")
    Migration(own_cluster, slot, src, dst).begin()
    importing = dst.client()
    pipe = importing.pipeline(transaction=False)
    pipe.execute_command("ASKING")
    pipe.set(key, "stale")
    pipe.execute()
    sink = connect_sink(own_cluster.url.replace("redis://", "redis://split:pw@"))
    assert isinstance(sink, ClusterSink)
    with pytest.raises(redis.exceptions.NoPermissionError) as refused:
        sink.unlink([key])
    assert f"refused UNLINK of '{key}';" in str(refused.value), refused.value
    cmd(dst, "ACL", "SETUSER", "split", "~*")
    assert sink.unlink([key]) == 1
    sink.close()
    importing.close()


def _owner(c: RedisClusterServer, key: str) -> RedisServer:
    client = c.nodes[0].client()
    try:
        slots = client.execute_command("CLUSTER", "SLOTS")
    finally:
        client.close()
    slot = key_slot(key.encode())
    port = next(int(p[1]) for start, end, p, *_ in slots if start <= slot <= end)
    return next(node for node in c.nodes if node.port == port)


CLUSTER_USER = ["resetchannels", "-@all", "+unlink", "+scan", "+info", "+ping"]
CLUSTER_USER += ["+client|setname", "+cluster|slots", "+cluster|nodes", "+command", "+asking"]


def test_a_listener_survives_a_node_refusing_a_new_connection_mid_batch(
    own_cenv: Env, own_cluster: RedisClusterServer, tmp_path: Path
) -> None:
    """Through `run`: a batch's UNLINK written to X (its writes paused, so its reply is
    late), then Y refusing a new connection (NOPERM for CLIENT SETNAME). X's connection
    went back to its pool with the reply owed; once Y was fixed, the identity check's
    INFO on it read that reply, and the listener died (AttributeError: 'int' object has
    no attribute 'splitlines'; a review). Now: it lives, the change whose key X's ACL
    refuses waits unacknowledged, and goes through once the ACL allows it."""
    x, y, z = own_cluster.nodes
    uid = next(
        i
        for i in range(1, 10_000)
        if _owner(own_cluster, f"user:{i}") is x and _owner(own_cluster, f"user:email:u{i}@x") is y
    )
    oid = next(i for i in range(1, 10_000) if _owner(own_cluster, f"order:{i}") is x)
    own_cenv.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, total int);"
        f"INSERT INTO users VALUES ({uid}, 'u{uid}@x', 'n'); INSERT INTO orders VALUES ({oid}, 1)"
    )
    config = write_config(
        tmp_path / "cluster.toml",
        database_url=own_cenv.dsn,
        redis_url=z.url.replace("redis://", "redis://cdc:pw@"),
        redis_timeout_s=5,  # (the default: past X's pause; FAST's 2 s times the read out)
        source_mark=False,
        tables={
            "public.users": ["user:{id}", "user:email:{email}"],
            "public.orders": ["order:{id}"],
        },
    )
    assert main(["install", "--config", str(config)]) == 0
    admins = {node.port: node.client() for node in own_cluster.nodes}
    for node in own_cluster.nodes:
        keys = "~user:*" if node is x else "~*"
        admins[node.port].execute_command("ACL", "SETUSER", "cdc", "on", ">pw", keys, *CLUSTER_USER)
    email, order = f"user:email:u{uid}@x", f"order:{oid}"
    admins[x.port].set(order, "stale")
    admins[y.port].set(email, "stale")
    listener = ListenerProcess(config, tmp_path / "listener.log").start()
    try:
        wait_until(lambda: listener.logged("redis_identity_recorded"), what="Redis known")
        admins[y.port].execute_command("ACL", "SETUSER", "cdc", "-client|setname")
        admins[y.port].execute_command("CLIENT", "KILL", "USER", "cdc")
        admins[x.port].execute_command("CLIENT", "PAUSE", 3000, "WRITE")  # (X's replies late)
        own_cenv.sql(f"UPDATE users SET name = 'x' WHERE id = {uid}")
        wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
        own_cenv.sql(f"UPDATE orders SET total = 2 WHERE id = {oid}")
        admins[y.port].execute_command("ACL", "SETUSER", "cdc", "+client|setname")
        process = listener.process
        assert process is not None
        wait_until(
            lambda: admins[y.port].exists(email) == 0 or process.poll() is not None,
            timeout_s=30,
            what="Y's key deleted once Y takes connections again",
        )
        assert process.poll() is None, [
            line.get("raw") for line in listener.lines() if line["event"] == "<non-json>"
        ][-1:]
        assert admins[x.port].get(order) == b"stale"  # (refused: its batch waits)
        assert own_cenv.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") >= 1
        admins[x.port].execute_command("ACL", "SETUSER", "cdc", "~order:*")
        wait_until(lambda: admins[x.port].exists(order) == 0, what="deleted once allowed")
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        listener.kill()
        for admin in admins.values():
            admin.close()


def test_nodes_an_ask_named_are_let_go_once_their_migration_is_over(
    own_cluster: RedisClusterServer,
) -> None:
    """An UNLINK answered ASK by a node the slot table does not list yet (a resharding
    to a node just added) is sent to that node on a connection of the sink's own. Each
    was kept, with its connection, for the life of the listener: four reshardings, each
    to a node added for it, left four (a review), though each node was in the slot
    table, or no longer owned anything, once its migration ended. Now the sink lets go
    of those an unlink did not use."""
    c = own_cluster
    sink = _sink(c, c.nodes[1])
    key = "order:1"
    slot = key_slot(key.encode())
    kept = []
    try:
        for _ in range(4):
            sink.client.nodes_manager.initialize()  # (the last migration's owner)
            owner_port = sink.client.nodes_manager.get_node_from_slot(slot).port
            owner = next(n for n in c.nodes if n.port == owner_port)
            sink.client.set(key, "cached")
            new = c.add_node()
            move = Migration(c, slot, owner, new)
            move.begin()
            move.move_keys()
            assert sink.unlink([key]) == 1  # (ASK: the key is on the new node)
            # (A primary that gave away its last slot became a replica of the taker.)
            for node in (move.dst, move.src, *c.nodes):
                with contextlib.suppress(redis.ResponseError):
                    cmd(node, "CLUSTER", "SETSLOT", slot, "NODE", move.dst_id)
            c.wait_ok()
            sink.unlink(["order:2"])  # a batch after the migration
            kept.append(len(sink._asked))
        assert kept == [0, 0, 0, 0]
    finally:
        sink.close()
