"""Sweeps (TRUNCATE, unrenderable changes, the sweep after a lost slot) against real
servers: the glob translation against Redis's own MATCH, one SCAN pass for all of a
batch's patterns, every primary of a cluster swept, and sweeps off the head of the line.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.cluster import RedisCluster

from cdc_invalidator.capture.logical import SWEPT_HISTORY_AGAIN_S
from cdc_invalidator.mapping import Invalidation, Routed
from cdc_invalidator.sink import ClusterSink, RedisSink
from cdc_invalidator.sink.glob import GlobSet
from cdc_invalidator.sink.scan_pass import ServerSweep
from cdc_invalidator.sink.slots import pack_unlinks
from tests.support.cluster import cluster_env, new_cluster
from tests.support.env import Env, Servers
from tests.support.faults import crash_onto_the_snapshot, with_rdb_snapshots
from tests.support.listener import ListenerProcess, Spawn, listening, stop_listener
from tests.support.servers import RedisClusterServer, RedisServer
from tests.support.sync import SLOT, install, settle
from tests.support.waits import wait_until

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


@pytest.mark.parametrize(
    "patterns",
    [
        [b"user:*", b"user:email:*"],  # MATCH user:* is one of them: the page as it comes
        [b"user:*:profile", b"user:email:*"],  # MATCH user:* is none: matched here
        [b"user:[0-9]*", b"user:email:*"],
        [b"*", b"user:*"],
        [b"user:\\*", b"user:\\*x"],  # MATCH is the escaped prefix and a star
    ],
    ids=["wider-is-match", "wider-is-not", "class", "star", "escaped"],
)
def test_a_scanned_page_keeps_what_the_patterns_match(
    rd: redis.Redis, patterns: list[bytes]
) -> None:
    """A page SCAN returned for `match`, kept or matched here: what the server's MATCH
    finds for the patterns one by one, no more, no less."""
    keys = [
        *(f"user:{i}" for i in range(50)),
        *(f"user:{i}:profile" for i in range(50)),
        *(f"user:email:{i}@x" for i in range(50)),
        "user:",
        "user:*",
        "user:*x",
        "user:x",
        "users:1",
        "session:1",
    ]
    rd.mset(dict.fromkeys(keys, b"1"))
    globs = GlobSet(patterns)
    page = [bytes(k) for k in rd.scan_iter(match=globs.match, count=1000)]
    assert set(globs.scanned(page)) == set().union(*(_server_match(rd, p) for p in patterns))
    if globs.match in patterns:  # the page as it came: no matching on our side
        assert globs.scanned(page) is page


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


def _flaky(sink: RedisSink, fail_at: int) -> list[str]:
    """Make the `fail_at`-th write of a SCAN or UNLINK, or read of their replies, on the
    sink's pooled connections fail as a dropped connection would (the write not made,
    or the reply lost after Redis ran the command); what was injected, in a list."""
    pool = sink.client.connection_pool
    get_connection = pool.get_connection
    calls = itertools.count(1)
    injected: list[str] = []

    def fail(conn: redis.Connection, what: str) -> None:
        injected.append(what)
        conn.disconnect()
        raise redis.ConnectionError(f"injected: {what}")

    def flaky_connection(*args: Any, **kwargs: Any) -> redis.Connection:
        conn = get_connection(*args, **kwargs)
        if getattr(conn, "flaky", False):
            return conn
        send, read = conn.send_packed_command, conn.read_response

        def send_packed_command(command: Any, check_health: bool = True) -> None:
            packed = b"".join(command)
            if (b"\r\nSCAN\r\n" in packed or b"\r\nUNLINK\r\n" in packed) and next(
                calls
            ) == fail_at:
                fail(conn, "write")
            send(command, check_health=check_health)  # type: ignore[no-untyped-call]

        def read_response(*args: Any, **kwargs: Any) -> Any:
            reply = read(*args, **kwargs)
            if isinstance(reply, list | int) and next(calls) == fail_at:
                fail(conn, f"reply {reply!r:.20}")
            return reply

        conn.send_packed_command = send_packed_command  # type: ignore[method-assign]
        conn.read_response = read_response  # type: ignore[method-assign]
        conn.flaky = True  # type: ignore[attr-defined]
        return conn

    pool.get_connection = flaky_connection  # type: ignore[method-assign]
    return injected


def test_a_sweep_resumes_after_a_failure_at_any_write_or_reply(own_redis: RedisServer) -> None:
    """Every point of a pipelined pass where its connection can fail (the write of a
    SCAN with the last page's UNLINKs; a SCAN's reply; an UNLINK's, the command run but
    its reply lost; the last page's), once each: the pass resumes and every matching key
    goes, none of the others."""
    swept = [f"user:{i}" for i in range(350)]
    kept = {f"session:{i}": "1" for i in range(150)}
    points = 0
    client = own_redis.client()
    for fail_at in itertools.count(1):
        client.flushall()
        client.mset(dict.fromkeys(swept, "1"))
        client.mset(kept)
        # The sweep's own client, its connections made flaky: pages of about 100 keys,
        # UNLINKs of 40.
        sink = RedisSink(own_redis.client(), scan_count=100, unlink_chunk=40)
        injected = _flaky(sink, fail_at)
        deleted = sink.sweep(["user:*"])
        sink.close()
        assert client.exists(*swept) == 0, (fail_at, injected)
        assert client.dbsize() == len(kept), (fail_at, injected)
        assert 0 < deleted <= len(swept), (fail_at, injected)
        if not injected:
            break  # past the last point
        points += 1
    client.close()
    assert points > 20  # several pages, each with its UNLINKs


def test_a_sweep_whose_connection_is_killed_resumes_where_it_was(rd: redis.Redis) -> None:
    """The sweep's connection killed between pages, twice: the pass goes on from its
    cursor on a new one (a pass over, not the whole keyspace again), and every matching
    key goes, each counted once."""
    swept = [f"user:{i}" for i in range(3000)]
    rd.mset(dict.fromkeys(swept, "1"))
    rd.mset({f"session:{i}": "1" for i in range(3000)})
    sink = RedisSink(rd, scan_count=100)  # pages of about 100 keys: some 60 of them
    one_pass = _scans_of(lambda: sink.sweep(["nothing:*"]), rd)
    pages = 0
    killed = []

    def stopped() -> bool:  # asked between pages: kill the sweep's connection twice
        nonlocal pages
        pages += 1
        if pages in (5, 20):
            killed.append(rd.client_kill_filter(_type="normal", skipme=True))
        return False

    scans = _scans_of(lambda: sink.sweep(["user:*"], stopped), rd)
    assert len(killed) == 2, killed
    assert all(killed), killed
    assert rd.exists(*swept) == 0
    assert rd.dbsize() == 3000
    assert scans <= one_pass + 2 * 2, (scans, one_pass)  # at most a page again per kill


def test_a_sweep_resumed_on_another_server_starts_over(
    rd: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SCAN cursor means nothing to another server (a failover, a restart, a name
    that now points elsewhere): when the server after a failure is not the one before,
    the pass starts over instead of resuming."""
    # Keys the sweep leaves: a pass over what is left after half a pass is most of one.
    rd.mset({f"user:{i}": "1" for i in range(3000)})
    rd.mset({f"session:{i}": "1" for i in range(6000)})
    sink = RedisSink(rd, scan_count=100)
    one_pass = _scans_of(lambda: sink.sweep(["nothing:*"]), rd)  # some 90 pages
    # The server before the failure, and after it (asked again as the pass ends).
    servers = itertools.chain(["a/1"], itertools.repeat("b/2"))
    monkeypatch.setattr(sink, "identity", lambda: next(servers))
    pages = 0

    def stopped() -> bool:
        nonlocal pages
        pages += 1
        if pages == 45:  # half way
            assert rd.client_kill_filter(_type="normal", skipme=True) >= 1
        return False

    scans = _scans_of(lambda: sink.sweep(["user:*"], stopped), rd)
    assert rd.dbsize() == 6000
    # Half a pass, then one over 7,500 keys: about 45 + 75 SCANs (resumed: about 90).
    assert scans >= one_pass + 20, (scans, one_pass)


def _scans_of(sweep: Callable[[], object], client: redis.Redis) -> int:
    before = _scans(client)
    sweep()
    return _scans(client) - before


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RedisClusterServer]:
    with new_cluster() as cluster:
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


# --- sweeps off the head of the line ----------------------------------------------------

ORDERS = {"public.orders": ["order:{id}", "order:customer:{customer_id}"]}
USERS = {"public.users": ["user:{id}"]}
# Enough unrelated keys that a sweep is still running when a change committed after the
# TRUNCATE has been invalidated (each test checks that it was).
UNRELATED = 400_000
ORDER_KEYS = 5_000


def setup_tables(env: Env, **settings: object) -> Path:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, name text)")
    env.sql("INSERT INTO users VALUES (1, 'a')")
    env.sql("CREATE TABLE orders (id int PRIMARY KEY, customer_id int)")
    env.sql("INSERT INTO orders SELECT i, i FROM generate_series(1, 10) i")
    # Second deletes off: a second sweep would run after the first and blur which
    # sweep did what (second sweeps are not what these tests are about). Logical mode:
    # the slot told where we are every 100 ms, so that an acknowledgement that ran ahead
    # of the sweep would be seen while it runs. SCAN pages of 100 keys: a sweep of
    # UNRELATED keys takes several times longer than at the default (more round trips),
    # time for the checks made while it runs.
    fast: dict[str, object] = {"second_delete_ms": 0, "status_interval_ms": 100, "scan_count": 100}
    return install(env, {**ORDERS, **USERS}, "config.toml", **{**fast, **settings})


def fill(r: redis.Redis | RedisCluster) -> list[str]:
    """UNRELATED keys no template matches, and the orders' cached keys (returned)."""
    for start in range(0, UNRELATED, 10_000):
        chunk = {f"unrelated:{i}": "v" for i in range(start, start + 10_000)}
        if isinstance(r, RedisCluster):
            r.mset_nonatomic(chunk)
        else:
            r.mset(chunk)
    orders = [f"order:{i}" for i in range(ORDER_KEYS)]
    orders += [f"order:customer:{i}" for i in range(ORDER_KEYS)]
    if isinstance(r, RedisCluster):
        r.mset_nonatomic(dict.fromkeys(orders, "v"))
    else:
        r.mset(dict.fromkeys(orders, "v"))
    return orders


def truncate_then_update(env: Env) -> str:
    """TRUNCATE orders, then a single-row UPDATE of users in a transaction of its own;
    the WAL position before the TRUNCATE's transaction."""
    before = env.scalar("SELECT pg_current_wal_insert_lsn()::text")
    env.sql("TRUNCATE orders")
    env.sql("UPDATE users SET name = 'b' WHERE id = 1")
    return str(before)


def saved_events(env: Env) -> int:
    """Trigger mode: the events counted by the listener's saves so far."""
    return int(env.scalar("SELECT events_processed FROM cdc_invalidator.listener_state_v1"))


def saved_since(env: Env, events: int) -> None:
    """Trigger mode: wait for a save that counts the TRUNCATE and the UPDATE (2 events
    past `events`): one that, if holds were ignored, would have saved past them both."""
    if not env.logical:
        wait_until(lambda: saved_events(env) >= events + 2, what="progress saved")


def acknowledged_past_truncate(env: Env, before: str) -> bool:
    """Whether the TRUNCATE has been acknowledged: trigger mode, its transaction is
    visible in the saved snapshot (or pruned); logical mode, the slot is confirmed past `before`."""
    if env.logical:
        return bool(
            env.scalar(
                "SELECT confirmed_flush_lsn > %s::pg_lsn FROM pg_replication_slots"
                " WHERE slot_name = %s",
                [before, SLOT],
            )
        )
    # (A queue row is pruned only once the saved snapshot sees it: gone is acknowledged.)
    return bool(
        env.scalar(
            "SELECT coalesce((SELECT pg_visible_in_snapshot(q.xid, s.snapshot)"
            " FROM cdc_invalidator.queue_v1 q, cdc_invalidator.listener_state_v1 s"
            " WHERE q.op = 'T'), true)"
        )
    )


@pytest.mark.usefixtures("capture")
def test_a_change_during_a_truncate_sweep_is_invalidated_at_once(own_env: Env) -> None:
    # SCAN pages of 20 keys: the sweep lasts some seconds, well past the checks below
    # (at 100, a loaded clean-clone run once saw it done before them).
    config = setup_tables(own_env, scan_count=20)
    r = own_env.redis()
    orders = fill(r)
    with listening(config) as listener:
        sweeper = listener.runner.sweeper
        settle(own_env, r)
        r.set("user:1", "cached")
        events = 0 if own_env.logical else saved_events(own_env)
        before = truncate_then_update(own_env)
        wait_until(lambda: r.exists("user:1") == 0, what="the UPDATE's key deleted")
        saved_since(own_env, events)
        # ... while the TRUNCATE's sweep had not completed, nor been acknowledged (all
        # seen before the sweep was found still running).
        acknowledged = acknowledged_past_truncate(own_env, before)
        health = listener.runner.health(60, 3600).detail
        pending = sweeper.pending
        metrics = listener.runner.metrics.registry
        gauge = metrics.get_sample_value("cdc_invalidator_sweeps_pending")
        assert sweeper.completed == 0, "the sweep was meant to be running still"
        assert not acknowledged
        assert (pending, health["sweeps_pending"], gauge) == (1, 1, 1.0)

        wait_until(lambda: sweeper.completed == 1, timeout_s=60, what="the sweep done")
        assert r.exists(*orders) == 0
        assert r.dbsize() == UNRELATED  # every unrelated key kept
        assert metrics.get_sample_value("cdc_invalidator_sweeps_pending") == 0.0
        assert metrics.get_sample_value("cdc_invalidator_sweeps_total") == 1.0
        assert metrics.get_sample_value("cdc_invalidator_keys_swept_total") == len(orders)
        settle(own_env, r)
        assert acknowledged_past_truncate(own_env, before)
        assert sweeper.pending == 0


@pytest.mark.usefixtures("capture")
def test_a_change_during_a_replays_sweep_is_invalidated_at_once(own_env: Env, spawn: Spawn) -> None:
    """Redis restarts on a snapshot taken before a TRUNCATE: the replay sweeps the
    table's keys again, on the sweeper's thread. A change committed meanwhile has its
    keys deleted at once (the loop waited for the whole SCAN before); the new identity
    is saved once the sweep is done."""
    with_rdb_snapshots(own_env)
    config = setup_tables(own_env, scan_count=20, replay_history="1h")
    r = own_env.redis()
    orders = fill(r)
    listener = spawn(config)
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    r.save()  # the orders' keys cached, and 400,000 others
    own_env.sql("TRUNCATE orders")
    wait_until(lambda: listener.logged("sweep_completed"), timeout_s=60, what="the TRUNCATE swept")
    identity = "SELECT identity FROM cdc_invalidator.redis_identity_v1"
    before = own_env.scalar(identity)
    crash_onto_the_snapshot(own_env)  # the orders' keys are back
    r = own_env.redis()
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    r.set("user:1", "cached")
    own_env.sql("UPDATE users SET name = 'b' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="the UPDATE's key deleted")
    assert not listener.logged("replay_sweep_done"), "the sweep was meant to be running still"
    assert own_env.scalar(identity) == before, "saved only once the sweep is done"

    wait_until(lambda: listener.logged("replay_sweep_done"), timeout_s=60, what="the sweep")
    # Every order key the restore brought back was found by the sweep.
    assert listener.logged("replay_sweep_done")[0]["existed"] == len(orders)
    assert r.exists(*orders) == 0
    assert r.exists("unrelated:0", f"unrelated:{UNRELATED - 1}") == 2
    wait_until(lambda: own_env.scalar(identity) != before, what="the new identity saved")
    stop_listener(listener)


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_sweep_cut_short_is_not_acknowledged_and_comes_again(
    own_env: Env, spawn: Spawn, stop: str
) -> None:
    # SCAN pages of 20 keys: the sweep lasts a second or two, not 0.3 s, which a loaded
    # machine's checks below outlasted (the stop landed after the sweep had finished).
    config = setup_tables(own_env, scan_count=20)
    r = own_env.redis()
    fill(r)
    first: ListenerProcess = spawn(config)
    settle(own_env, r)
    r.set("user:1", "cached")
    events = 0 if own_env.logical else saved_events(own_env)
    before = truncate_then_update(own_env)
    wait_until(lambda: r.exists("user:1") == 0, what="the UPDATE's key deleted")
    saved_since(own_env, events)
    if stop == "SIGKILL":
        first.kill()  # mid-sweep, nothing saved on the way out
    else:
        # A clean stop gives the sweep up and saves progress: the position before it.
        assert stop_listener(first)["sweeps"] == 0
        assert first.logged("sweep_given_up")
    assert not first.logged("sweep_completed"), "the stop was meant to land mid-sweep"
    if own_env.logical:
        wait_until(
            lambda: own_env.scalar(
                "SELECT active_pid IS NULL FROM pg_replication_slots WHERE slot_name = %s",
                [SLOT],
            ),
            what="the slot released",
        )
    # The UPDATE after it was deleted, but nothing from the TRUNCATE on acknowledged.
    assert not acknowledged_past_truncate(own_env, before)

    r.set("order:1", "cached again")  # the next listener's sweep must take it
    second: ListenerProcess = spawn(config)
    wait_until(lambda: r.exists("order:1") == 0, timeout_s=60, what="the TRUNCATE swept again")
    wait_until(lambda: second.logged("sweep_completed"), what="the sweep's completion")
    settle(own_env, r)
    assert acknowledged_past_truncate(own_env, before)
    assert stop_listener(second)["sweeps"] == 1


@pytest.fixture
def own_cluster_env(
    servers: Servers, own_cluster: RedisClusterServer, tmp_path: Path, capture: str
) -> Iterator[Env]:
    yield from cluster_env(servers, own_cluster, tmp_path, capture)


def test_on_a_cluster_a_change_during_a_sweep_is_invalidated_at_once(
    own_cluster_env: Env, own_cluster: RedisClusterServer
) -> None:
    env = own_cluster_env
    # SCAN pages of 20 keys, as in the test above: at 100 a loaded clean-clone run once
    # saw the three primaries' sweep done before the checks below.
    config = setup_tables(env, scan_count=20)
    rc = RedisCluster.from_url(own_cluster.url, decode_responses=True)
    try:
        orders = fill(rc)
        with listening(config) as listener:
            sweeper = listener.runner.sweeper
            settle_cluster(env, rc)
            rc.set("user:1", "cached")
            events = 0 if env.logical else saved_events(env)
            before = truncate_then_update(env)
            wait_until(lambda: rc.exists("user:1") == 0, what="the UPDATE's key deleted")
            saved_since(env, events)
            acknowledged = acknowledged_past_truncate(env, before)
            assert sweeper.completed == 0, "the sweep was meant to be running still"
            assert not acknowledged

            wait_until(lambda: sweeper.completed == 1, timeout_s=60, what="the sweep done")
            assert rc.exists(*orders) == 0
            assert sum(node.client().dbsize() for node in own_cluster.nodes) == UNRELATED
            settle_cluster(env, rc)
            assert acknowledged_past_truncate(env, before)
    finally:
        rc.close()


def settle_cluster(env: Env, rc: RedisCluster) -> None:
    """settle() through the cluster (sync points are plain keys)."""
    settle(env, cast(redis.Redis, rc))


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("capture", ["logical"], ids=["logical"])
def test_a_change_during_the_sweep_after_missed_changes_is_invalidated_at_once(
    own_env: Env,
) -> None:
    # SCAN pages of 20 keys, as in the tests above (at the default, a run beside the
    # Sentinel tests once saw the sweep done before the checks below).
    config = setup_tables(own_env, scan_count=20)
    own_env.sql("UPDATE cdc_invalidator.slot_state_v1 SET resync_reason = 'owed: a test said so'")
    r = own_env.redis()
    orders = fill(r)
    r.set("user:1", "cached")
    with listening(config) as listener:
        sweeper = listener.runner.sweeper
        wait_until(lambda: sweeper.pending == 1, what="the owed sweep handed to the sweeper")
        own_env.sql("UPDATE users SET name = 'b' WHERE id = 1")
        wait_until(lambda: r.exists("user:1") == 0, what="the UPDATE's key deleted")
        owed = own_env.scalar("SELECT resync_reason FROM cdc_invalidator.slot_state_v1")
        assert sweeper.completed == 0, "the sweep was meant to be running still"
        assert owed == "owed: a test said so", "owed until the sweep is done"

        wait_until(lambda: sweeper.completed == 1, timeout_s=60, what="the sweep done")
        assert r.exists(*orders) == 0
        wait_until(
            lambda: (
                own_env.scalar("SELECT resync_reason FROM cdc_invalidator.slot_state_v1") is None
            ),
            what="the sweep no longer owed",
        )
        settle(own_env, r)


def test_a_sweep_is_done_again_as_its_second_delete(env: Env) -> None:
    env.sql("CREATE TABLE orders (id int PRIMARY KEY, customer_id int)")
    # A second delete due 5 s after the TRUNCATE was visible: the first sweep (a few
    # keys) is long done by then, and a stale SET lands in between.
    config = install(env, ORDERS, second_delete_ms=5000)
    r = env.redis()
    r.set("order:1", "cached")
    with listening(config) as listener:
        sweeper = listener.runner.sweeper
        settle(env, r)
        env.sql("TRUNCATE orders")
        wait_until(lambda: sweeper.completed == 1, what="the first sweep")
        assert r.exists("order:1") == 0
        assert sweeper.pending == 0, "acknowledged: the second sweep holds nothing"
        r.set("order:1", "stale, from a reader that read before the TRUNCATE")
        wait_until(lambda: sweeper.completed == 2, what="the second sweep")
        assert r.exists("order:1") == 0
        assert sweeper.keys_swept_again == 1


def test_a_sweep_goes_before_a_second_sweep_not_yet_due(env: Env) -> None:
    env.sql("CREATE TABLE orders (id int PRIMARY KEY, customer_id int)")
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    # The TRUNCATE of orders owes a second sweep 5 s after it was visible; the TRUNCATE
    # of users, committed meanwhile, is swept at once, not after that second sweep.
    config = install(env, {**ORDERS, **USERS}, second_delete_ms=5000)
    r = env.redis()
    with listening(config) as listener:
        sweeper = listener.runner.sweeper
        settle(env, r)
        env.sql("TRUNCATE orders")
        wait_until(lambda: sweeper.completed == 1, what="the first sweep of orders")
        r.set("order:1", "stale, from a reader that read before the TRUNCATE")
        r.set("user:1", "cached")
        env.sql("TRUNCATE users")
        wait_until(lambda: r.exists("user:1") == 0, what="the sweep of users")
        assert r.exists("order:1") == 1, "the second sweep of orders was not due yet"
        assert sweeper.keys_swept_again == 0
        wait_until(lambda: sweeper.keys_swept_again == 1, what="the second sweep of orders")
        assert r.exists("order:1") == 0


@contextmanager
def scan_refused(r: redis.Redis) -> Iterator[None]:
    """SCAN refused (NOPERM, as from an ACL being fixed): sweeps fail, UNLINK works."""
    r.execute_command("ACL", "SETUSER", "default", "-scan")
    try:
        yield
    finally:
        r.execute_command("ACL", "SETUSER", "default", "+scan")


@pytest.mark.usefixtures("capture")
def test_a_failing_sweep_is_retried_and_holds_its_acknowledgement(own_env: Env) -> None:
    config = setup_tables(own_env)
    r = own_env.redis()
    r.set("order:1", "cached")
    with listening(config) as listener:
        sweeper = listener.runner.sweeper
        settle(own_env, r)
        with scan_refused(r):
            r.set("user:1", "cached")
            events = 0 if own_env.logical else saved_events(own_env)
            before = truncate_then_update(own_env)
            wait_until(lambda: r.exists("user:1") == 0, what="the UPDATE's key deleted")
            wait_until(lambda: sweeper.failures >= 2, what="the sweep tried again")
            saved_since(own_env, events)
            assert r.exists("order:1") == 1
            assert sweeper.pending == 1
            assert not acknowledged_past_truncate(own_env, before)
        wait_until(lambda: sweeper.completed == 1, what="the sweep done once SCAN works")
        assert r.exists("order:1") == 0
        settle(own_env, r)
        assert acknowledged_past_truncate(own_env, before)


# The history rows that hold a text, and when the last was written.
HISTORY_WITH = (
    "SELECT count(*), max(at) FROM cdc_invalidator.history_v1 WHERE strpos(events::text, %s) > 0"
)


def history_with(env: Env, text: str) -> tuple[int, Any]:
    with env.connect() as conn:
        row = conn.execute(HISTORY_WITH, [text]).fetchone()
    assert row is not None
    return int(row[0]), row[1]


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("capture", ["logical"], ids=["logical"])  # trigger: the queue
def test_a_sweeps_history_is_written_again_once_the_sweep_is_done(own_env: Env) -> None:
    """Logical mode: a batch with a sweep has its replay history written when it is
    handed back (its keys are deleted: a replay meanwhile must find them), and again
    when the sweep is done. A replay takes the rows written within its window: a sweep
    that failed for longer than that deletes after the first row has aged out of it."""
    config = setup_tables(own_env, replay_history="1h")
    r = own_env.redis()
    r.set("order:1", "cached")
    with listening(config) as listener:
        sweeper = listener.runner.sweeper
        settle(own_env, r)
        with scan_refused(r):
            truncate_then_update(own_env)
            wait_until(lambda: sweeper.failures >= 2, what="the sweep tried again")
            # Changes after it, until the history writer, past its gathering (0.2 s),
            # writes their history with whatever it gathered before them.
            ids = itertools.count(1000)

            def a_later_change_written() -> bool:
                own_env.sql("INSERT INTO users VALUES (%s, 'later')", [next(ids)])
                return history_with(own_env, '"users","I"')[0] > 0

            wait_until(a_later_change_written, what="the history of changes after the TRUNCATE")
            assert history_with(own_env, '"T"')[0] == 1, "the TRUNCATE's, as handed back"
            # A sweep that takes longer than that has its history written again (one
            # done sooner does not: its first row is as good).
            time.sleep(SWEPT_HISTORY_AGAIN_S)
            failing_at = own_env.scalar("SELECT now()")
        wait_until(lambda: sweeper.completed == 1, what="the sweep done once SCAN works")
        assert r.exists("order:1") == 0
        wait_until(
            lambda: history_with(own_env, '"T"')[0] == 2,
            what="the TRUNCATE's history written again",
        )
        assert history_with(own_env, '"T"')[1] > failing_at


def test_a_sweep_is_run_when_the_connection_dies_as_its_batch_is_acknowledged(
    own_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trigger mode: the listener's backend is terminated while Redis deletes a batch
    that holds a sweep (a TRUNCATE) and is large enough to turn NOTIFY off
    (UNLISTEN_AT). The batch was done and is not read again; its sweep must still run
    and its hold be released, whatever PostgreSQL call fails next (UNLISTEN was once
    that call, between the acknowledgement and the sweep's handing over: the sweep was
    never run, and nothing saved or pruned past it)."""
    config = setup_tables(own_env)
    r = own_env.redis()
    r.set("order:1", "cached")
    with listening(config) as listener:
        settle(own_env, r)
        delete_routed = listener.sink.delete_routed
        armed, cut = threading.Event(), threading.Event()

        def delete_then_cut(routed: Any, later: bool = False) -> int:
            deleted = delete_routed(routed, later=later)
            if armed.is_set() and not cut.is_set():
                cut.set()
                pids = own_env.scalar(
                    "SELECT array_agg(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'cdc-invalidator'"
                )
                own_env.sql("SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) p", [pids])
                wait_until(
                    lambda: (
                        not own_env.scalar(
                            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
                        )
                    ),
                    what="the listener's sessions gone",
                )
            return deleted

        monkeypatch.setattr(listener.sink, "delete_routed", delete_then_cut)
        armed.set()
        before = str(own_env.scalar("SELECT pg_current_wal_insert_lsn()::text"))
        with own_env.connect() as conn, conn.transaction():
            conn.execute("TRUNCATE orders")
            conn.execute("INSERT INTO users SELECT i, 'n' FROM generate_series(2, 11) i")
        wait_until(cut.is_set, what="the batch's deletes, and the cut")
        wait_until(lambda: r.exists("order:1") == 0, what="the TRUNCATE's sweep done")
        settle(own_env, r)
        assert acknowledged_past_truncate(own_env, before)
        assert listener.runner.postgres.failures >= 1  # the cut was seen


@pytest.mark.usefixtures("capture")
def test_sweeps_waiting_behind_one_are_swept_together(own_env: Env) -> None:
    config = setup_tables(own_env)
    r = own_env.redis()
    fill(r)
    with listening(config) as listener:
        sweeper = listener.runner.sweeper
        settle(own_env, r)
        own_env.sql("TRUNCATE orders")
        wait_until(lambda: sweeper.pending == 1, what="the first sweep handed over")
        # Two more, each in a batch of its own (handed over one by one), while it runs.
        own_env.sql("TRUNCATE users")
        wait_until(lambda: sweeper.pending == 2, what="the second sweep handed over")
        r.set("order:1", "cached again")
        own_env.sql("TRUNCATE orders")
        wait_until(lambda: sweeper.pending == 3, what="the third sweep handed over")
        assert sweeper.completed == 0, "the first sweep was meant to be running still"

        wait_until(lambda: sweeper.pending == 0, timeout_s=60, what="every sweep done")
        assert sweeper.completed == 2, "the two that waited were swept in one pass"
        assert r.exists("order:1") == 0
        settle(own_env, r)


@pytest.mark.usefixtures("capture")
def test_the_second_sweep_a_killed_listener_owed_holds_no_change_back(
    own_env: Env, spawn: Spawn
) -> None:
    """A listener killed after a TRUNCATE's sweep, before its second sweep fell due: the
    next listener sweeps again (second_deletes.redo_owed) on the sweeper's thread. A
    change committed before it started has its keys deleted while that sweep runs, not
    a full SCAN later."""
    config = setup_tables(own_env, second_delete_ms=5000, replay_history="1h")
    r = own_env.redis()
    orders = fill(r)
    first = spawn(config)
    wait_until(lambda: first.logged("redis_identity_recorded"), what="the listener started")
    before = own_env.scalar("SELECT pg_current_wal_insert_lsn()::text")
    own_env.sql("TRUNCATE orders")  # (alone: no key of users:1 for the next one to redo)
    wait_until(lambda: first.logged("sweep_completed"), timeout_s=60, what="the sweep done")
    wait_until(lambda: acknowledged_past_truncate(own_env, before), what="the TRUNCATE acked")
    first.kill()
    assert not [done for done in first.logged("sweep_completed") if done["second"]]
    r.mset(dict.fromkeys(orders, "stale"))  # what its second sweep was owed for
    own_env.sql("UPDATE users SET name = 'c' WHERE id = 1")
    r.set("user:1", "cached")

    second = spawn(config)
    wait_until(lambda: r.exists("user:1") == 0, what="the UPDATE's key deleted")
    assert r.exists(*orders) > 0, "the change was held behind the sweep"
    wait_until(lambda: second.logged("sweep_completed"), timeout_s=60, what="the redo's sweep")
    assert r.exists(*orders) == 0
    assert r.dbsize() == UNRELATED
    [redone] = second.logged("second_deletes_redone")
    assert redone["sweeps_handed_over"] == len(ORDERS["public.orders"]), redone
    stop_listener(second)


def test_a_pass_that_ends_on_another_server_than_it_began_on_goes_again(
    rd: redis.Redis,
) -> None:
    """Through Sentinel, a pass's connection stays on the old master to its end after a
    failover, and that server's resync discards its deletes (a review lost a TRUNCATE's
    sweep so). A pass is done only if the server is still the one it began on: here the
    identity it is told changes at the end of the first pass, when the keys are written
    again (what the new master still holds), and a second pass deletes them."""
    swept = [f"user:{i}" for i in range(300)]
    rd.mset(dict.fromkeys(swept, "1"))
    rd.set("session:1", "kept")
    asked = itertools.count()

    def identity() -> str:
        n = next(asked)
        if n == 0:
            return "old master"
        if n == 1:
            rd.mset(dict.fromkeys(swept, "1"))
        return "new master"

    sweep = ServerSweep(
        rd.connection_pool,
        identity,
        GlobSet(["user:*"]),
        100,
        lambda page: [pack_unlinks([list[str | bytes](page)])] if page else [],
    )
    assert sweep.run() == 300  # (what the new server held: the old one's pass not counted)
    assert rd.exists(*swept) == 0
    assert rd.get("session:1") == b"kept"
    assert next(asked) == 3, "asked as it began, and after each pass"


def test_a_sweep_of_two_databases_goes_again_if_the_server_changed_by_its_end(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass checks its own server as it ends, but a TRUNCATE of tables routed to
    two databases is one batch: the first database's pass may end before the sentinels
    name the new master and the second's after, and the first's deletes stayed on the
    old master (a review). The whole sweep goes again when the server is another by the
    time its passes are done; here the keys of both are written again (what the new
    master holds) as that is asked."""
    db0, db1 = own_redis.client(db=1), own_redis.client(db=2)
    for client in (db0, db1):
        client.flushdb()
    keys0, keys1 = [f"a:{i}" for i in range(200)], [f"b:{i}" for i in range(100)]
    db0.mset(dict.fromkeys(keys0, "1"))
    db1.mset(dict.fromkeys(keys1, "1"))
    sink = RedisSink(own_redis.client(db=0), scan_count=100)
    asked = itertools.count()

    def identity() -> str:
        n = next(asked)
        if n == 1:  # the passes done on "the old master"
            db0.mset(dict.fromkeys(keys0, "1"))
            db1.mset(dict.fromkeys(keys1, "1"))
            return "new master"
        return "old master" if n == 0 else "new master"

    monkeypatch.setattr(sink, "identity", identity)
    # (two databases other than the sink's own: their passes ask their own sinks)
    works: Routed = {1: Invalidation(patterns={"a:*"}), 2: Invalidation(patterns={"b:*"})}
    assert sink.sweep_routed(works) == 300
    assert (db0.exists(*keys0), db1.exists(*keys1)) == (0, 0)
    assert next(asked) == 4, "asked before and after each round"
    sink.close()
    for client in (db0, db1):
        client.close()
