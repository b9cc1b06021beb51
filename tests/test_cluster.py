"""Redis Cluster: a real cluster of three masters, the listener given one node's URL.

The cluster (tests.support.servers.RedisClusterServer: redis-server with cluster mode
on, `redis-cli --cluster create`) serves the module; tests that move slots or stop nodes
get one of their own. Every wait is on an event (wait_until), never on a clock.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, TryAgainError

from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.cli import main
from cdc_invalidator.mapping import Invalidation
from cdc_invalidator.sink import ClusterSink, RedisSink, connect_sink, open_sink
from cdc_invalidator.sink.cluster_sink import ClusterChanging
from cdc_invalidator.sink.connect import RedisOptions
from cdc_invalidator.sink.oversize import LEAST_LIMIT
from cdc_invalidator.sink.redis_sink import server_identity
from cdc_invalidator.sink.slots import group_by_slot, pack_unlinks
from tests.support.cluster import Migration, cluster_env, cmd, new_cluster, node_of
from tests.support.env import Env, Servers, capture_of
from tests.support.faults import PENDING, bulk_limit_at
from tests.support.listener import Spawn, listening
from tests.support.logs import captured_logs
from tests.support.servers import RedisClusterServer, RedisServer
from tests.support.sync import SYNC, install
from tests.support.sync import settle as settle_on
from tests.support.tail import StartedTails
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    with new_cluster() as c:
        yield c


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServer]:
    """A cluster for one test alone: free to move slots, stop and restart nodes."""
    with new_cluster() as c:
        yield c


@pytest.fixture
def cenv(
    servers: Servers, cluster: RedisClusterServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Env]:
    yield from cluster_env(servers, cluster, tmp_path, capture_of(request))


@pytest.fixture
def own_cenv(servers: Servers, own_cluster: RedisClusterServer, tmp_path: Path) -> Iterator[Env]:
    yield from cluster_env(servers, own_cluster, tmp_path, "trigger")


def _rc(env: Env) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(env.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def rc(cenv: Env) -> Iterator[RedisCluster]:
    yield from _rc(cenv)


@pytest.fixture
def own_rc(own_cenv: Env) -> Iterator[RedisCluster]:
    yield from _rc(own_cenv)


def settle(env: Env, rc: RedisCluster) -> None:
    """test_semantics.settle through the cluster client (it needs only SET and EXISTS)."""
    settle_on(env, cast(redis.Redis, rc))


def keys_per_node(c: RedisClusterServer, pattern: str = "*") -> list[int]:
    counts = []
    for node in c.nodes:
        client = node.client()
        counts.append(sum(1 for _ in client.scan_iter(match=pattern, count=1000)))
        client.close()
    return counts


def cache_users(rc: RedisCluster, ids: Sequence[int] | range) -> list[str]:
    cached = {f"user:{i}": "cached" for i in ids}
    cached.update({f"user:email:u{i}@x": str(i) for i in ids})
    for start in range(0, len(cached), 5000):
        rc.mset_nonatomic(dict(list(cached.items())[start : start + 5000]))
    return list(cached)


def users_table(env: Env, rows: int) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        f"INSERT INTO users SELECT g, 'u' || g || '@x', 'n' FROM generate_series(1, {rows}) g"
    )


# --- the pipeline on a cluster ------------------------------------------------------------


@pytest.mark.usefixtures("capture")
def test_changes_delete_keys_on_every_master(
    cenv: Env, cluster: RedisClusterServer, rc: RedisCluster
) -> None:
    users_table(cenv, 60)
    config = install(cenv, USERS)
    changed = cache_users(rc, range(1, 61))
    inserted = cache_users(rc, [100])  # a negative cache: "no user 100"
    unrelated = {f"other:{i}": "keep" for i in range(60)}
    rc.mset_nonatomic(unrelated)
    assert all(n > 10 for n in keys_per_node(cluster, "user:*")), "keys on every master"
    with listening(config) as listener:
        cenv.sql(
            "INSERT INTO users VALUES (100, 'u100@x', 'new');"
            "UPDATE users SET name = 'changed' WHERE id <= 30;"
            "DELETE FROM users WHERE id > 30 AND id <= 60"
        )
        wait_until(lambda: rc.exists(*changed, *inserted) == 0, what="every changed row's keys")
        settle(cenv, rc)
        assert isinstance(listener.sink.sink, ClusterSink)
    assert rc.mget_nonatomic(list(unrelated)) == list(unrelated.values())


@pytest.mark.usefixtures("capture")
def test_truncate_sweeps_every_master(
    cenv: Env, cluster: RedisClusterServer, rc: RedisCluster
) -> None:
    users_table(cenv, 1)
    config = install(cenv, USERS)
    # More than a SCAN page on each node (scan_count 1000): the sweep must page.
    swept = cache_users(rc, range(1, 2001))
    unrelated = {f"users:{i}": "not user:*" for i in range(300)}
    unrelated.update({f"xuser:{i}": "prefix differs" for i in range(300)})
    rc.mset_nonatomic(unrelated)
    assert all(n > 1000 for n in keys_per_node(cluster, "user:*"))
    with listening(config):
        cenv.sql("TRUNCATE users")
        wait_until(lambda: keys_per_node(cluster, "user:*") == [0, 0, 0], what="user:* swept")
        settle(cenv, rc)
    assert rc.exists(*swept) == 0
    assert rc.mget_nonatomic(list(unrelated)) == list(unrelated.values())


def test_a_batch_of_thousands_of_keys_on_all_nodes(cenv: Env, rc: RedisCluster) -> None:
    users_table(cenv, 6000)
    config = install(cenv, USERS)
    cached = cache_users(rc, range(1, 6001))  # 12,000 keys over ~8,000 slots
    with listening(config) as listener:
        cenv.sql("UPDATE users SET name = 'bulk'")
        wait_until(lambda: rc.exists(*cached) == 0, what="12,000 keys deleted")
        settle(cenv, rc)
        # Batches of up to batch_size (5000) events, 10,000 keys, one pipeline per node.
        assert listener.runner.keys_deleted >= len(cached)
        assert listener.runner.redis.available is True


def test_check_reports_the_cluster(cenv: Env, capsys: pytest.CaptureFixture[str]) -> None:
    users_table(cenv, 1)
    config = install(cenv, USERS)
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    assert "a Redis Cluster of 3 primaries, each reachable" in capsys.readouterr().out


# --- slots that move ------------------------------------------------------------------------


def _exists_asking(node: RedisServer, key: str) -> int:
    """EXISTS on a node importing the key's slot (it answers only after ASKING)."""
    client = node.client()
    try:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.exists(key)
        return int(pipe.execute()[1])
    finally:
        client.close()


def _other(c: RedisClusterServer, node: RedisServer) -> RedisServer:
    return next(n for n in c.nodes if n is not node)


def test_slot_moved_while_listening_moved_is_followed(
    own_cenv: Env, own_cluster: RedisClusterServer, own_rc: RedisCluster
) -> None:
    users_table(own_cenv, 2)
    config = install(own_cenv, USERS)
    cache_users(own_rc, [1, 2])
    src = node_of(own_cluster, own_rc, "user:1")
    dst = _other(own_cluster, src)
    with listening(config):
        # A first change: the listener has read the slot table.
        own_cenv.sql("UPDATE users SET name = 'x' WHERE id = 2")
        wait_until(lambda: own_rc.exists("user:2") == 0, what="the first change's keys")
        migration = Migration(own_cluster, key_slot(b"user:1"), src, dst)
        migration.begin()
        migration.move_keys()
        migration.finish()
        assert cmd(dst, "EXISTS", "user:1") == 1
        # The listener's slot table still names src: its UNLINK is answered MOVED.
        own_cenv.sql("UPDATE users SET name = 'y' WHERE id = 1")
        wait_until(lambda: cmd(dst, "EXISTS", "user:1") == 0, what="user:1 deleted on its new node")
        settle(own_cenv, own_rc)


def test_slot_half_migrated_ask_is_followed_and_sweeps_wait(
    own_cenv: Env, own_cluster: RedisClusterServer, own_rc: RedisCluster
) -> None:
    users_table(own_cenv, 2)
    config = install(own_cenv, USERS)
    cache_users(own_rc, [1, 2])
    src = node_of(own_cluster, own_rc, "user:1")
    migration = Migration(own_cluster, key_slot(b"user:1"), src, _other(own_cluster, src))
    with listening(config) as listener:
        migration.begin()
        migration.move_keys()  # user:1 now on dst; the slot still belongs to src
        assert _exists_asking(migration.dst, "user:1") == 1
        own_cenv.sql("UPDATE users SET name = 'y' WHERE id = 1")  # src answers ASK
        wait_until(
            lambda: _exists_asking(migration.dst, "user:1") == 0, what="user:1 deleted on dst"
        )
        # A sweep while a slot migrates could miss keys in flight: it waits, retrying
        # (behind the loop: its batch unacknowledged, other changes' keys deleted).
        swept = cache_users(own_rc, range(3, 200))
        own_cenv.sql("TRUNCATE users")
        sweeper = listener.runner.sweeper
        wait_until(lambda: sweeper.failures >= 2, what="the sweep refused")
        assert own_rc.exists(*swept) == len(swept)
        assert sweeper.pending == 1
        own_rc.set("sync:0", "cached")
        own_cenv.sql("INSERT INTO sync VALUES (0)")
        wait_until(lambda: own_rc.exists("sync:0") == 0, what="a change during the refusals")
        assert listener.runner.redis.available is True
        migration.finish()
        wait_until(lambda: own_rc.exists(*swept) == 0, what="the sweep once the slot moved")
        wait_until(lambda: sweeper.pending == 0, what="the sweep done")
        settle(own_cenv, own_rc)


def test_ask_to_a_node_that_owns_no_slot_yet_is_followed(
    own_cluster: RedisClusterServer,
) -> None:
    """A slot migrating to a node just added (`redis-cli --cluster reshard` to a new
    node): CLUSTER SLOTS does not list a node without slots, so redis-py's slot table
    does not know it. Keys the source answers ASK for are deleted there, after ASKING
    (redis-py's own following failed with an AttributeError, and the listener exited at
    every start until the slot had moved)."""
    sink = connect_sink(own_cluster.url)
    assert isinstance(sink, ClusterSink)
    moved, never, stayed = "{t}moved", "{t}never-cached", "{t}stayed"
    sink.client.mset({moved: "cached", stayed: "cached"})
    src = node_of(own_cluster, sink.client, moved)
    new = own_cluster.add_node()
    migration = Migration(own_cluster, key_slot(moved.encode()), src, new)
    migration.begin()
    cmd(src, "MIGRATE", "127.0.0.1", new.port, "", 0, 5000, "KEYS", moved)
    # One UNLINK of the slot: src holds only `stayed` (TRYAGAIN), then key by key: ASK
    # for the two it does not hold.
    assert sink.unlink([moved, never, stayed]) == 2
    assert _exists_asking(new, moved) == 0
    with pytest.raises(AskError):  # (src answers ASK for a key it does not hold)
        cmd(src, "EXISTS", stayed)
    assert sink.unlink([never]) == 0  # alone: ASK at once
    sink.close()


def test_a_node_down_holds_the_batch_until_it_is_back(
    own_cenv: Env, own_cluster: RedisClusterServer, own_rc: RedisCluster
) -> None:
    users_table(own_cenv, 1)
    config = install(own_cenv, USERS)
    cache_users(own_rc, [1])
    node = node_of(own_cluster, own_rc, "user:1")
    cmd(node, "SAVE")  # the restarted node loads user:1 again from its dump
    with listening(config) as listener:
        settle(own_cenv, own_rc)
        node.stop()
        own_cenv.sql("UPDATE users SET name = 'y' WHERE id = 1")
        wait_until(lambda: listener.runner.redis.failures >= 2, what="batches failing")
        # Held, not acknowledged: the UPDATE's event, and it alone, is past the listener's
        # saved progress. (Rows it processed before stay in the table until pruned.)
        with own_cenv.connect() as conn:
            pending = conn.execute(PENDING.encode()).fetchall()
        assert [user for _, user in pending] == [1]
        node.start()
        own_cluster.wait_ok()
        info = cmd(node, "INFO", "persistence")
        assert isinstance(info, dict)
        assert info["rdb_last_load_keys_loaded"] >= 1  # user:1 came back with the dump
        wait_until(lambda: listener.runner.redis.available is True, 30, "redis_available")
        settle(own_cenv, own_rc)  # the held batch was done, and acknowledged
        assert cmd(node, "EXISTS", "user:1") == 0


# --- the sink on its own ------------------------------------------------------------------


def test_open_sink_tells_a_cluster_from_a_server(cluster: RedisClusterServer) -> None:
    with RedisServer.create() as single:
        sink = open_sink(single.url)
        assert isinstance(sink.sink, RedisSink)
        sink.close()
    sink = open_sink(cluster.nodes[2].url)
    assert isinstance(sink.sink, ClusterSink)
    sink.close()


@pytest.mark.servers  # starts a Redis of its own
def test_open_sink_connects_at_first_use() -> None:
    server = RedisServer.create()
    sink = open_sink(RedisOptions(server.url, timeout_s=1))  # nothing listens: no error
    with pytest.raises(redis.ConnectionError):
        sink.unlink(["k"])
    with server:
        server.client().set("k", "v")
        assert sink.unlink(["k"]) == 1
        sink.close()


def test_a_cluster_has_only_database_0(cluster: RedisClusterServer) -> None:
    with pytest.raises(Fatal, match="database 3"):
        connect_sink(cluster.nodes[0].url.replace("/0", "/3"))


def test_a_slots_keys_past_unlink_chunk_go_in_several_unlinks(cluster: RedisClusterServer) -> None:
    """One UNLINK per slot, of at most unlink_chunk keys: seven keys of one hash tag with
    a chunk of three are three UNLINKs, every key deleted, the others' too."""
    sink = connect_sink(cluster.url, unlink_chunk=3)
    assert isinstance(sink, ClusterSink)
    client = sink.client
    tagged = [f"{{chunked}}:{i}" for i in range(7)]
    others = [f"unchunked:{i}" for i in range(20)]
    client.mset_nonatomic({key: "v" for key in tagged + others})
    node = client.nodes_manager.slots_cache[key_slot(b"chunked")][0]
    direct = client.get_redis_connection(node)

    def unlinks() -> int:
        stats: dict[str, dict[str, int]] = direct.info("commandstats")
        return stats.get("cmdstat_unlink", {}).get("calls", 0)

    by_node = sink._by_node(tagged)
    assert [len(command) for _, commands in by_node for command in commands] == [3, 3, 1]
    before = unlinks()
    assert sink.unlink(tagged + others) == 27
    # The node's other UNLINKs: one per slot of the other keys that it serves.
    served = node_slots(client, node)
    other_slots = {slot for key in others if (slot := key_slot(key.encode())) in served}
    assert unlinks() - before == 3 + len(other_slots)
    assert client.exists(*tagged, *others) == 0
    sink.close()


def test_a_key_too_long_for_its_node_is_left_out_the_rest_deleted(
    cluster: RedisClusterServer,
) -> None:
    """sink/oversize.py on a cluster: a node answers an UNLINK naming a key longer than
    its proto-max-bulk-len with a protocol error, every time. Left out (and logged), the
    other keys of its node and of the others are deleted; the limit is each node's."""
    nodes = [node.client() for node in cluster.nodes]
    sink = connect_sink(cluster.url)
    assert isinstance(sink, ClusterSink)
    with bulk_limit_at(LEAST_LIMIT, *nodes):
        client = sink.client
        keys = [f"short:{i}" for i in range(300)]
        long_key = "{short:7}" + "z" * LEAST_LIMIT  # in one slot with a short key
        client.mset_nonatomic(dict.fromkeys(keys, "v"))
        with captured_logs() as logs:
            assert sink.unlink([*keys[:150], long_key, *keys[150:]]) == len(keys)
        assert client.exists(*keys) == 0
        [line] = [e for e in logs if e["event"] == "key_too_long_for_redis"]
        assert line["key_bytes"] == len(long_key)
    for node in nodes:
        node.close()
    sink.close()


def node_slots(client: RedisCluster, node: ClusterNode) -> set[int]:
    return {slot for slot, owners in client.nodes_manager.slots_cache.items() if owners[0] == node}


def test_identity_changes_when_a_node_restarts(own_cluster: RedisClusterServer) -> None:
    sink = connect_sink(own_cluster.url)
    assert isinstance(sink, ClusterSink)
    before = sink.identity()
    assert len(before.split(",")) == 3
    assert sink.identity() == before
    own_cluster.restart_node(2)
    after = sink.identity()
    assert after != before
    assert len(set(after.split(",")) & set(before.split(","))) == 2  # the other two nodes
    sink.close()


@pytest.mark.servers  # starts a Redis of its own
def test_identity_of_one_server_changes_when_it_restarts() -> None:
    with RedisServer.create() as server:
        sink = connect_sink(server.url)
        before = sink.identity()
        assert sink.identity() == before
        server.restart()
        assert sink.identity() != before
        sink.close()


def test_a_sweep_refuses_while_a_slot_migrates(own_cluster: RedisClusterServer) -> None:
    sink = connect_sink(own_cluster.url)
    assert isinstance(sink, ClusterSink)
    src, dst = own_cluster.nodes[0], own_cluster.nodes[1]
    slot = _first_slot(src)
    migration = Migration(own_cluster, slot, src, dst)
    migration.begin()
    with pytest.raises(ClusterChanging):
        sink.sweep(["user:*"])
    migration.finish()
    assert sink.sweep(["user:*"]) == 0
    sink.close()


def test_a_sweep_is_complete_without_a_key_orphaned_by_a_migration_given_up(
    own_cluster: RedisClusterServer,
) -> None:
    """A key MIGRATEd to a node, then the migration given up (CLUSTER SETSLOT ...
    STABLE on both sides), stays on a node that does not own its slot: every UNLINK
    there is answered MOVED, and no client reads it. The sweep completes without it and
    says so (it failed as "a key moved during a sweep", every retry, for good, holding
    its TRUNCATE's acknowledgement)."""
    sink = connect_sink(own_cluster.url)
    assert isinstance(sink, ClusterSink)
    orphan, beside = "{t}orphan", "{t}beside"
    for key in (orphan, beside, "{u}other"):
        sink.client.set(key, "x")
    src = node_of(own_cluster, sink.client, orphan)
    dst = _other(own_cluster, src)
    migration = Migration(own_cluster, key_slot(orphan.encode()), src, dst)
    migration.begin()
    cmd(src, "MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", orphan)
    for node in (src, dst):
        cmd(node, "CLUSTER", "SETSLOT", migration.slot, "STABLE")
    assert sink.sweep(["{t}*", "{u}*"]) == 2  # (logged: sweep_orphan_keys, the node, slot)
    assert sink.client.exists(beside, "{u}other", orphan) == 0  # (the orphan: unreachable)
    assert cmd(dst, "SCAN", 0, "MATCH", "{t}*", "COUNT", 1000) == (0, [orphan.encode()])
    sink.close()


def test_a_primarys_sweep_resumes_where_it_was_when_its_connection_is_killed(
    cluster: RedisClusterServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary's pass is a single server's (sink/scan_pass.py): its connection killed
    twice mid-sweep, it goes on from its cursor on a new one, not from the start, and
    every matching key goes."""
    sink = connect_sink(cluster.url, scan_count=100)
    assert isinstance(sink, ClusterSink)
    client = sink.client
    swept = [f"swept:{i}" for i in range(3000)]
    kept = [f"kept:{i}" for i in range(6000)]
    client.mset_nonatomic(dict.fromkeys(swept + kept, "1"))
    node = cluster.nodes[0]
    direct = node.client()
    # Who asked node 0 who it is: as a pass begins, once again per resume, and as it
    # ends; and which thread is node 0's pass.
    asked_identity: list[str] = []
    node_thread: list[int] = []

    def counted_identity(of: redis.Redis) -> str:
        found = server_identity(of)
        if of.connection_pool.connection_kwargs.get("port") == node.port:
            asked_identity.append(found)
            node_thread.append(threading.get_ident())
        return found

    monkeypatch.setattr("cdc_invalidator.sink.cluster_sink.server_identity", counted_identity)

    def scans() -> int:
        stats: dict[str, dict[str, int]] = direct.info("commandstats")
        return stats.get("cmdstat_scan", {}).get("calls", 0)

    try:
        before = scans()
        assert sink.sweep(["nothing:*"]) == 0
        one_pass = scans() - before  # on this node: some 30 pages
        asked_identity.clear()
        node_thread.clear()
        pages = 0
        killed: list[int] = []

        def stopped() -> bool:  # asked between pages, by each primary's thread
            nonlocal pages
            if node_thread and threading.get_ident() == node_thread[0]:
                pages += 1
                if pages in (5, 15):  # node 0's pass, between its pages
                    killed.append(direct.client_kill_filter(_type="normal", skipme=True))
            return False

        before = scans()
        deleted = sink.sweep(["swept:*"], stopped)
        scanned = scans() - before
        assert len(killed) == 2, killed
        assert len(asked_identity) == 1 + 2 + 1, "node 0's pass resumed twice"
        assert len(set(asked_identity)) == 1
        assert client.exists(*swept) == 0
        assert sum(keys_per_node(cluster, "kept:*")) == len(kept)
        # (an UNLINK run whose reply the kill lost is not counted: its keys were gone after)
        assert 0 < deleted <= len(swept)
        # Resumed: at most a page again per kill (from the start: some 20 more).
        assert scanned <= one_pass + 2 * 2, (scanned, one_pass)
    finally:
        client.delete(*swept, *kept)
        direct.close()
        sink.close()


def _first_slot(node: RedisServer) -> int:
    client = node.client()
    try:
        me = next(v for v in client.cluster("nodes").values() if "myself" in v["flags"])
        return int(me["slots"][0][0])
    finally:
        client.close()


def test_a_node_restarted_from_its_dump_is_replayed(
    own_cenv: Env, own_cluster: RedisClusterServer, own_rc: RedisCluster
) -> None:
    """The identity the listener watches covers every primary: one node coming back
    with keys deleted since its dump gets them deleted again."""
    users_table(own_cenv, 1)
    own_cenv.sql("CREATE TABLE IF NOT EXISTS sync (id int PRIMARY KEY)")
    config = own_cenv.config({**USERS, **SYNC}, replay_history="1h", redis_check_interval_ms=100)
    assert main(["install", "--config", str(config)]) == 0
    cache_users(own_rc, [1])
    node = node_of(own_cluster, own_rc, "user:1")
    cmd(node, "SAVE")  # its dump holds user:1
    with listening(config):
        own_cenv.sql("UPDATE users SET name = 'y' WHERE id = 1")
        wait_until(lambda: own_rc.exists("user:1") == 0, what="the first delete")
        before = own_cenv.scalar("SELECT identity FROM cdc_invalidator.redis_identity_v1")
        node.restart()
        own_cluster.wait_ok()
        info = cmd(node, "INFO", "persistence")
        assert isinstance(info, dict)
        assert info["rdb_last_load_keys_loaded"] >= 1  # user:1 came back with the dump
        wait_until(
            lambda: (
                own_cenv.scalar("SELECT identity FROM cdc_invalidator.redis_identity_v1") != before
            ),
            what="the new identity seen",
        )
        wait_until(lambda: cmd(node, "EXISTS", "user:1") == 0, what="user:1 deleted again")


def test_a_replays_sweep_waits_for_a_migration_while_changes_go_on(
    own_cenv: Env, own_cluster: RedisClusterServer, own_rc: RedisCluster, spawn: Spawn
) -> None:
    """A replay whose window holds a TRUNCATE sweeps, and a Cluster refuses to sweep while
    a slot migrates (keys in flight could be missed). The sweep waits for the migration,
    while later changes are invalidated meanwhile: the whole loop waited before, and a
    resharding (or one left half done) can last hours. The new identity is saved once
    the sweep is done."""
    users_table(own_cenv, 2)
    own_cenv.sql("CREATE TABLE IF NOT EXISTS sync (id int PRIMARY KEY)")
    config = own_cenv.config({**USERS, **SYNC}, replay_history="1h", redis_check_interval_ms=100)
    assert main(["install", "--config", str(config)]) == 0
    listener = spawn(config)
    own_cenv.sql("TRUNCATE users")  # in the replay's window: a sweep of user:*
    own_rc.set("sync:0", "cached")
    own_cenv.sql("INSERT INTO sync VALUES (0)")
    wait_until(lambda: own_rc.exists("sync:0") == 0, what="the TRUNCATE and a change after it")
    identity = "SELECT identity FROM cdc_invalidator.redis_identity_v1"
    before = own_cenv.scalar(identity)
    src, dst, other = own_cluster.nodes
    migration = Migration(own_cluster, _first_slot(src), src, dst)
    migration.begin()
    other.restart()  # a new run_id: the listener replays
    own_cluster.wait_ok()
    swept = cache_users(own_rc, range(1, 50))
    wait_until(lambda: listener.logged("replay_sweep_deferred"), what="the sweep deferred")
    own_rc.set("sync:1", "cached")
    own_cenv.sql("INSERT INTO sync VALUES (1)")
    wait_until(lambda: own_rc.exists("sync:1") == 0, what="a change during the migration")
    assert own_rc.exists(*swept) == len(swept), "not swept while the slot migrates"
    assert own_cenv.scalar(identity) == before, "the new identity is not saved yet"
    migration.finish()
    wait_until(lambda: own_rc.exists(*swept) == 0, what="the sweep once the slot moved")
    wait_until(lambda: own_cenv.scalar(identity) != before, what="the new identity saved")
    assert listener.logged("replay_sweep_done")


def test_a_cluster_refuses_other_databases_per_table(cluster: RedisClusterServer) -> None:
    sink = connect_sink(cluster.url)
    assert isinstance(sink, ClusterSink)
    with pytest.raises(Fatal, match="redis_db = 2"):
        sink.delete_routed({None: Invalidation({"a"}), 2: Invalidation({"b"})})
    assert sink.delete_routed({None: Invalidation({"a"}), 0: Invalidation({"b"})}) == 0
    sink.close()


# The minimal ACL of docs/redis.md, plus what a cluster needs (its "Redis Cluster" section).
CLUSTER_ACL = (
    "on >secret ~* resetchannels -@all +unlink +scan +info +ping +client|setname"
    " +cluster|slots +cluster|nodes +command +asking"
)


def test_the_source_mark_is_read_and_written_where_its_slot_lives(
    cluster: RedisClusterServer,
) -> None:
    """The source mark (redis_guard/source.py) on a cluster: one key, on the primary its
    slot maps to, read back through any node."""
    key = "cdc_invalidator:source:7001:app"
    sink = connect_sink(cluster.nodes[0].url)
    assert isinstance(sink, ClusterSink)
    assert sink.read_mark(key) is None
    sink.write_mark(key, "16384 timeline 2")
    other = connect_sink(cluster.nodes[2].url)
    assert other.read_mark(key) == "16384 timeline 2"
    rc = RedisCluster.from_url(cluster.url, decode_responses=True)
    assert rc.delete(key) == 1
    rc.close()
    other.close()
    sink.close()


def test_the_documented_acl_is_enough_for_a_cluster(cluster: RedisClusterServer) -> None:
    for node in cluster.nodes:
        cmd(node, "ACL", "SETUSER", "cdc_cluster", *CLUSTER_ACL.split())
    rc = RedisCluster.from_url(cluster.url, decode_responses=True)
    cache_users(rc, range(1, 50))
    rc.mset_nonatomic({"k1": "v", "k2": "v", "other": "keep"})
    sink = connect_sink(cluster.nodes[2].url.replace("redis://", "redis://cdc_cluster:secret@"))
    assert isinstance(sink, ClusterSink)
    assert sink.delete(Invalidation({"k1", "k2"}, {"user:*"})) == 2 + 2 * 49
    assert len(sink.identity().split(",")) == 3
    assert rc.get("other") == "keep"
    sink.close()
    rc.close()


# --- the redis-py internals ClusterSink drives ---------------------------------------------
# ClusterSink packs and pipelines its UNLINKs itself, past redis-py's ClusterPipeline
# (cluster_sink.py says why), through internals no release promises to keep: the version
# range in pyproject.toml is the one these tests pass with. A release that changes one of
# them fails here, naming it, before a listener meets it.


def test_the_slot_table_is_a_dict_of_slot_to_nodes_primary_first(
    cluster: RedisClusterServer,
) -> None:
    sink = connect_sink(cluster.url)
    assert isinstance(sink, ClusterSink)
    client = sink.client
    manager = client.nodes_manager
    table = manager.slots_cache
    assert isinstance(table, dict), "RedisCluster.nodes_manager.slots_cache"
    assert set(table) == set(range(16384))
    assert all(isinstance(owners, list) and owners for owners in table.values())
    assert all(isinstance(node, ClusterNode) for owners in table.values() for node in owners)
    primaries = client.get_primaries()
    assert len(primaries) == 3
    assert all(isinstance(node, ClusterNode) and node.name for node in primaries)
    assert {owners[0].name for owners in table.values()} == {node.name for node in primaries}
    for slot in (0, 5000, 16383):
        assert manager.get_node_from_slot(slot) == table[slot][0]
    # The slot of a key as the server computes it (hash tags too).
    with cluster.nodes[0].client() as server:
        for key in (b"user:1", b"user:email:a@x", b"{user}:1", b"a{}b"):
            assert key_slot(key) == server.cluster("keyslot", key.decode())
    # Called with these arguments: a failed node, a MOVED reply.
    inspect.signature(manager.initialize).bind()
    inspect.signature(manager.move_slot).bind(MovedError("3999 127.0.0.1:6381"))
    sink.close()


def test_a_primarys_pool_hands_out_connections_that_take_packed_commands(
    cluster: RedisClusterServer,
) -> None:
    sink = connect_sink(cluster.url)
    assert isinstance(sink, ClusterSink)
    client = sink.client
    keys = [b"{contract}:a", b"{contract}:b", b"{contract}:c"]
    node = client.nodes_manager.slots_cache[key_slot(keys[0])][0]
    client.mset({key: b"v" for key in keys[:2]})
    pool = client.get_redis_connection(node).connection_pool
    inspect.signature(pool.get_connection).bind()  # no command name (redis-py >= 5.3)
    connection = pool.get_connection()
    try:
        commands: list[list[str | bytes]] = [list(keys[:2]), list(keys[2:])]
        packed = pack_unlinks(commands)
        # Our RESP is redis-py's, byte for byte.
        ours = connection.pack_commands([("UNLINK", *group) for group in commands])
        assert packed == b"".join(ours)
        connection.send_packed_command([packed])
        assert [connection.read_response(), connection.read_response()] == [2, 0]
        assert callable(connection.disconnect)
    finally:
        pool.release(connection)
    sink.close()


def test_hash_slots_are_the_clusters_own(cluster: RedisClusterServer) -> None:
    """group_by_slot() (C where built) puts each key where CLUSTER KEYSLOT says it
    belongs: hash tags, empty tags, UTF-8 and binary keys included."""
    keys: list[str | bytes] = ["user:1", "{user}:2", "a{}b", "{user", "x{a}{b}", "é{日}", b"\xff"]
    client = cluster.nodes[0].client()
    try:
        for slot, group in group_by_slot(keys).items():
            for key in group:
                assert client.execute_command("CLUSTER", "KEYSLOT", key) == slot
    finally:
        client.close()


def test_redirections_are_the_exceptions_cluster_sink_catches() -> None:
    assert issubclass(MovedError, AskError)  # caught first: the order in _unlink_per_node
    assert issubclass(AskError, redis.ResponseError)
    assert issubclass(TryAgainError, redis.ResponseError)
    moved = MovedError("3999 127.0.0.1:6381")
    assert (moved.slot_id, moved.host, moved.port) == (3999, "127.0.0.1", 6381)


def test_cluster_nodes_is_parsed_with_slots_and_migrations(cluster: RedisClusterServer) -> None:
    """_layout() reads CLUSTER NODES as redis-py parses it."""
    sink = connect_sink(cluster.url)
    assert isinstance(sink, ClusterSink)
    node = sink.client.get_primaries()[0]
    view = sink.client.get_redis_connection(node).cluster("nodes")
    me = next(v for v in view.values() if "myself" in v["flags"])
    assert isinstance(me["node_id"], str)
    assert me["migrations"] == []
    assert all(len(r) in (1, 2) and all(str(n).isdigit() for n in r) for r in me["slots"])
    sink.close()


def test_unlink_writes_once_to_each_primary_and_never_key_by_key(
    cluster: RedisClusterServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path on a real cluster: 3,000 keys over every slot's owner go out as one
    packed write per primary, none through redis-py's ClusterPipeline or
    RedisCluster.execute_command (the per-key path for redirections)."""
    keys = [f"fast:{i}" for i in range(3000)]
    rc = RedisCluster.from_url(cluster.url)
    rc.mset_nonatomic(dict.fromkeys(keys, "v"))
    rc.close()
    sink = connect_sink(cluster.url)
    assert isinstance(sink, ClusterSink)
    node = sink.client.get_primaries()[0]
    connection_class = sink.client.get_redis_connection(node).connection_pool.connection_class
    original = connection_class.send_packed_command
    writes: list[object] = []

    def spy(self: object, command: list[bytes], check_health: bool = True) -> None:
        if any(b"UNLINK" in part for part in command):
            writes.append(self)
        original(self, command, check_health)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a slow path: RedisCluster.execute_command or pipeline{args}")

    monkeypatch.setattr(connection_class, "send_packed_command", spy)
    monkeypatch.setattr(sink.client, "execute_command", refuse)
    monkeypatch.setattr(sink.client, "pipeline", refuse)
    assert sink.unlink(keys) == 3000
    assert len(writes) == 3
    assert len({id(connection) for connection in writes}) == 3
    sink.close()


# --- the operator's tools on a cluster --------------------------------------------------


def test_tail_and_explain_on_a_cluster(
    cenv: Env, rc: RedisCluster, started_tail: StartedTails, capsys: pytest.CaptureFixture[str]
) -> None:
    """tail subscribes on the node redis_url names (started_tail waits for that), where
    the listener asks NUMSUB; explain finds a key on whichever master owns its slot."""
    users_table(cenv, 200)
    config = install(cenv, USERS)
    with listening(config):
        tail = started_tail(cenv, config)
        done: list[int] = []

        def shown() -> bool:
            if any(" public.users UPDATE user:" in t for t in tail.lines()):
                return True
            i = len(done) + 1
            cenv.sql(f"UPDATE users SET name = 'x' WHERE id = {i % 200 + 1}")
            done.append(i)
            return False

        wait_until(shown, what="a change shown by tail", timeout_s=30)
        assert tail.interrupt() == 0, tail.stderr()
    keys = [f"user:{i}" for i in range(150, 200)]
    rc.mset_nonatomic(dict.fromkeys(keys, "cached"))
    assert len({node_of_key(rc, k) for k in keys}) == 3, "keys on every master"
    capsys.readouterr()
    for key in keys:
        assert main(["explain", key, "--config", str(config)]) == 0
        assert "in Redis now: yes, no expiry" in capsys.readouterr().out


def node_of_key(rc: RedisCluster, key: str) -> int:
    return int(rc.nodes_manager.get_node_from_slot(key_slot(key.encode())).port)
