"""Sweeps (TRUNCATE, unrenderable changes, the sweep after a lost slot) against real
servers: the glob translation against Redis's own MATCH, one SCAN pass for all of a
batch's patterns, every primary of a cluster swept, and sweeps off the head of the line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from redis.cluster import RedisCluster

from cdc_invalidator.sink import ClusterSink, RedisSink
from cdc_invalidator.sink.glob import GlobSet
from tests.support.evidence import unavailable
from tests.support.servers import RedisClusterServer, RedisServer, ServerError

# Keys with every character a glob treats specially, and bytes beyond ASCII.
TRICKY_KEYS = [
    b"user:1",
    b"user:12",
    b"user:",
    b"user:a",
    b"user:[",
    b"user:]",
    b"user:\\",
    b"user:*",
    b"user:?",
    b"user:-",
    b"user:^",
    b"user:\n",
    b"usEr:1",
    b"xuser:1",
    b"a]b",
    b"a-b",
    b"ab",
    b"a\\b",
    b"a[b",
    b"[",
    b"\\",
    b"*",
    b"?",
    b"]",
    b"-",
    b"\x00",
    b"\xff",
    b"\xc3\xa9t\xc3\xa9",
    b"a",
    b"b",
    b"z",
    b"A",
    b"user:1:name",
    b"user::",
]

TRICKY_PATTERNS = [
    b"*",
    b"**",
    b"?",
    b"user:*",
    b"user:?",
    b"user:??",
    b"user:\\*",
    b"user:\\?",
    b"user:\\[",
    b"user:\\\\",
    b"user:[",
    b"user:[a",
    b"user:[]",
    b"user:[]]",
    b"user:[^]",
    b"user:[^]]",
    b"user:[^1]",
    b"user:[^1]*",
    b"user:[0-9]",
    b"user:[9-0]",
    b"user:[0-9]*",
    b"user:[a-]",
    b"user:[a-]]",
    b"user:[-a]",
    b"user:[\\]]",
    b"user:[\\-]",
    b"user:[\\a-z]",
    b"user:[[]",
    b"user:[*?]",
    b"a[-]b",
    b"a[\\\\]b",
    b"a\\",
    b"\\",
    b"\\\\",
    b"[\\]",
    b"[a-\xff]",
    b"[\x80-\xff]",
    b"[^a-z]",
    b"*:*",
    b"*1",
    b"*1*",
    b"u*r:*",
    b"*\xa9*",
    b"[",
    b"]",
    b"[]",
    b"[^",
    b"a[",
    b"a[^b",
    b"user:[0-9",
    b"user:1[",
    b"?*?",
    b"user:1:*",
    b"user:*:*",
]


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: its keyspace is the test's to fill and flush."""
    try:
        server = RedisServer.create()
    except ServerError as exc:
        unavailable(f"no Redis: {exc}")
    with server:
        yield server


@pytest.fixture
def rd(own_redis: RedisServer) -> Iterator[redis.Redis]:
    client = own_redis.client()
    client.flushall()
    yield client
    client.flushall()
    client.close()


def _server_match(client: redis.Redis, pattern: bytes) -> set[bytes]:
    return set(cast("Iterator[bytes]", client.scan_iter(match=pattern, count=1000)))


def _scans(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


def test_glob_translation_matches_redis_match(rd: redis.Redis) -> None:
    rd.mset(dict.fromkeys(TRICKY_KEYS, b"1"))
    assert rd.dbsize() == len(TRICKY_KEYS)
    differ = {}
    for pattern in TRICKY_PATTERNS:
        ours = {key for key in TRICKY_KEYS if GlobSet([pattern]).matches(key)}
        theirs = _server_match(rd, pattern)
        if ours != theirs:
            differ[pattern] = (sorted(ours - theirs), sorted(theirs - ours))
    assert differ == {}
    # Several patterns at once match what any one of them matches.
    globs = GlobSet(TRICKY_PATTERNS[3:20])
    union = set().union(*(_server_match(rd, p) for p in TRICKY_PATTERNS[3:20]))
    assert set(globs.select(list(TRICKY_KEYS))) == union


def test_one_scan_pass_for_several_patterns(rd: redis.Redis) -> None:
    # Three tables' templates, and unrelated keys around them: more than one SCAN page.
    swept = [f"{prefix}:{i}" for prefix in ("user", "user:email", "order") for i in range(3000)]
    unrelated = [f"{prefix}:{i}" for prefix in ("users", "xuser", "session") for i in range(3000)]
    pipe = rd.pipeline(transaction=False)
    for key in swept + unrelated:
        pipe.set(key, "1")
    pipe.execute()
    sink = RedisSink(rd, scan_count=1000)

    before = _scans(rd)
    assert sink.sweep(["nothing:*"]) == 0
    one_pass = _scans(rd) - before
    assert one_pass > 5  # paged: a pass is several SCANs

    before = _scans(rd)
    deleted = sink.sweep(["user:*", "user:email:*", "order:*"])
    several = _scans(rd) - before
    assert deleted == len(swept)
    assert rd.exists(*swept) == 0
    assert rd.exists(*unrelated) == len(unrelated)
    # One pass over the keyspace (a pass per pattern would be three times one).
    assert several <= one_pass + 2


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RedisClusterServer]:
    try:
        cluster = RedisClusterServer.create()
    except ServerError as exc:
        unavailable(f"no Redis Cluster: {exc}")
    with cluster:
        yield cluster


def test_a_cluster_sweep_covers_every_primary(own_cluster: RedisClusterServer) -> None:
    rc = RedisCluster.from_url(own_cluster.url)
    try:
        swept = {f"user:{i}": "1" for i in range(3000)} | {f"order:{i}": "1" for i in range(3000)}
        unrelated = {f"users:{i}": "1" for i in range(1000)} | {f"x{i}": "1" for i in range(1000)}
        rc.mset_nonatomic({**swept, **unrelated})
        nodes = [node.client() for node in own_cluster.nodes]
        assert all(node.dbsize() > 1000 for node in nodes)
        before = [_scans(node) for node in nodes]
        sink = ClusterSink(rc, scan_count=500)
        assert sink.sweep(["user:*", "order:*"]) == len(swept)
        scans = [_scans(node) - b for node, b in zip(nodes, before, strict=True)]
        assert all(n > 1 for n in scans), scans  # every primary, paged
        assert [n.keys("user:*") + n.keys("order:*") for n in nodes] == [[], [], []]
        assert sum(node.dbsize() for node in nodes) == len(unrelated)
        for node in nodes:
            node.close()
    finally:
        rc.close()
