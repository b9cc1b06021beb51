"""cdc_invalidator.lease against real servers: a single Redis and a Redis Cluster of three
masters (keys spread over its slots), and once with the real listener revoking a lease.

Every wait is on an event: a key gone, other callers seen polling (CLIENT LIST), threads
joined; never on a clock. Concurrency is asserted by counts, never by timings.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from cdc_invalidator.lease import MARKER_PREFIX, Busy, Hit, Lease, LeaseCache, is_marker
from tests.support.env import Env
from tests.support.evidence import unavailable
from tests.support.faults import setup_users
from tests.support.listener import listening
from tests.support.servers import RedisClusterServer, ServerError
from tests.support.waits import wait_until

Client = redis.Redis | RedisCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    try:
        server = RedisClusterServer.create()
    except ServerError as exc:
        unavailable(f"no Redis Cluster: {exc}")
    with server:
        yield server


@pytest.fixture(params=["redis", "cluster"])
def client(request: pytest.FixtureRequest, env: Env) -> Iterator[Client]:
    """The same protocol on a single Redis and on a Cluster (flushed)."""
    c: Client
    if request.param == "redis":
        c = env.redis()
    else:
        server: RedisClusterServer = request.getfixturevalue("cluster")
        for node in server.nodes:
            node_client = node.client()
            node_client.flushall()
            node_client.close()
        c = RedisCluster.from_url(server.nodes[1].url, decode_responses=True)
    yield c
    c.close()


class Loader:
    """A loader that counts its calls and returns `value` (after running `during`)."""

    def __init__(self, value: str, during: Callable[[], object] = lambda: None) -> None:
        self.value = value
        self.during = during
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        self.during()
        return self.value


KEYS = [f"user:{i}" for i in range(1, 13)]


def test_keys_span_several_slots() -> None:
    """The Cluster runs below really spread the keys (three masters, 12 keys)."""
    assert len({key_slot(k.encode()) for k in KEYS}) == len(KEYS)


def test_a_miss_fills_and_a_hit_does_not_load(client: Client) -> None:
    leases = LeaseCache(client)
    for key in KEYS:
        load = Loader(f"row of {key}")
        assert leases.get_or_fill(key, load, ttl=30) == f"row of {key}"
        assert client.get(key) == f"row of {key}"
        assert 0 < client.pttl(key) <= 30_000
        assert leases.get_or_fill(key, load, ttl=30) == f"row of {key}"
        assert load.calls == 1


def test_no_ttl_means_no_expiry_and_a_timedelta_is_seconds(client: Client) -> None:
    leases = LeaseCache(client)
    leases.get_or_fill("user:1", Loader("a"))
    assert client.pttl("user:1") == -1  # the lease's expiry is dropped with the marker
    leases.get_or_fill("user:2", Loader("b"), ttl=timedelta(seconds=5))
    assert 0 < client.pttl("user:2") <= 5_000


def test_an_invalidation_between_lease_and_fill_refuses_the_fill(client: Client) -> None:
    leases = LeaseCache(client)
    for key in KEYS:
        # The listener's UNLINK lands while the loader works: its value may be stale.
        load = Loader("old row", during=lambda: client.unlink(key))  # noqa: B023 (called now)
        assert leases.get_or_fill(key, load) == "old row"  # the caller still gets it
        assert client.exists(key) == 0, "the stale fill was refused"
        assert leases.get_or_fill(key, Loader("new row")) == "new row"
        assert client.get(key) == "new row"


def test_a_plain_set_meanwhile_wins_over_the_fill(client: Client) -> None:
    leases = LeaseCache(client)
    load = Loader("loaded", during=lambda: client.set("user:1", "written"))
    assert leases.get_or_fill("user:1", load) == "loaded"
    assert client.get("user:1") == "written"


def test_a_crashed_fillers_lease_expires(client: Client) -> None:
    crashed = LeaseCache(client, lease_ms=300).acquire("user:1")
    assert isinstance(crashed, Lease)  # and it never fills
    assert is_marker(client.get("user:1"))
    impatient = LeaseCache(client, wait_ms=0)
    load = Loader("read through")
    assert impatient.get_or_fill("user:1", load) == "read through"
    assert load.calls == 1
    assert is_marker(client.get("user:1")), "a read-through does not fill"
    wait_until(lambda: client.exists("user:1") == 0, what="the crashed filler's lease expired")
    assert impatient.get_or_fill("user:1", Loader("fresh")) == "fresh"
    assert client.get("user:1") == "fresh"
    # The crashed filler coming back late: its lease is gone, its fill refused.
    assert LeaseCache(client).fill(crashed, "late") is False
    assert client.get("user:1") == "fresh"


def test_a_waiter_takes_over_a_lease_revoked_while_it_waits(client: Client) -> None:
    first = LeaseCache(client).acquire("user:1")
    assert isinstance(first, Lease)
    second = LeaseCache(client, wait_ms=0)
    assert isinstance(second.acquire("user:1"), Busy)
    client.unlink("user:1")  # the invalidation revokes the first lease
    taken = second.acquire("user:1")
    assert isinstance(taken, Lease)
    assert taken.marker != first.marker
    assert LeaseCache(client).fill(first, "stale") is False
    assert second.fill(taken, "fresh") is True
    assert second.acquire("user:1") == Hit("fresh")


def test_a_held_lease_that_is_gone_is_not_taken_again(client: Client) -> None:
    leases = LeaseCache(client)
    held = leases.acquire("user:1")
    assert isinstance(held, Lease)
    assert leases.acquire("user:1", held) == held  # still ours
    client.unlink("user:1")  # the invalidation revokes it
    assert isinstance(leases.acquire("user:1", held), Busy)  # at once, not after wait_ms
    assert client.exists("user:1") == 0
    assert leases.fill(held, "read under the revoked lease") is False
    assert isinstance(leases.acquire("user:1"), Lease)  # a new read takes a new one


def test_a_failing_loader_gives_the_lease_back(client: Client) -> None:
    leases = LeaseCache(client)

    def fails() -> str:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        leases.get_or_fill("user:1", fails)
    assert client.exists("user:1") == 0, "the next caller need not wait for the lease"
    with pytest.raises(TypeError, match=r"loader for key 'user:1' returned NoneType"):
        leases.get_or_fill("user:1", lambda: None)  # type: ignore[type-var]  # what is refused
    assert client.exists("user:1") == 0


def test_bytes_and_numbers_are_stored_as_given(env: Env) -> None:
    raw = redis.Redis.from_url(env.redis_url)  # no decode_responses: hits are bytes
    leases = LeaseCache(raw)
    pickled = b"\x80\x05\x95 a pickle"
    assert leases.get_or_fill("a", lambda: pickled) == pickled
    assert leases.get_or_fill("a", Loader("unused")) == pickled
    assert leases.get_or_fill("n", lambda: 42) == 42
    assert leases.get_or_fill("n", lambda: 0) == b"42"  # a hit: what Redis returns
    raw.close()


def test_bad_settings_are_refused_naming_them(client: Client) -> None:
    with pytest.raises(ValueError, match="lease_ms"):
        LeaseCache(client, lease_ms=0)
    with pytest.raises(ValueError, match="wait_ms"):
        LeaseCache(client, wait_ms=-1)
    with pytest.raises(ValueError, match=r"ttl for key 'user:1'"):
        LeaseCache(client).get_or_fill("user:1", Loader("x"), ttl=0)
    assert client.exists("user:1") == 0, "refused before any lease was taken"


def test_a_redis_error_is_raised_not_swallowed(env: Env) -> None:
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    load = Loader("x")
    with pytest.raises(redis.ConnectionError):
        LeaseCache(down).get_or_fill("user:1", load)
    assert load.calls == 0


# --- concurrent missers (a single Redis: CLIENT LIST shows who is polling) -------------------


def polling(r: redis.Redis, names: list[str]) -> bool:
    """Each named client's last command was the lease script (it found the lease taken)."""
    last = {c["name"]: c["cmd"] for c in r.client_list()}
    return all(last.get(name) == "evalsha" for name in names)


def test_concurrent_missers_wait_for_the_one_fill(env: Env) -> None:
    r = env.redis()
    n = 6
    names = [f"misser-{i}" for i in range(1, n)]
    results: dict[int, object] = {}
    others_load = Loader("the row")
    threads: list[threading.Thread] = []

    def miss(i: int) -> None:
        c = redis.Redis.from_url(env.redis_url, decode_responses=True, client_name=f"misser-{i}")
        results[i] = LeaseCache(c, wait_ms=30_000).get_or_fill("user:1", others_load)
        c.close()

    def holders_load() -> None:
        # With the lease held, the others miss and poll, and the database is read once.
        threads.extend(threading.Thread(target=miss, args=(i,)) for i in range(1, n))
        for t in threads:
            t.start()
        wait_until(lambda: polling(r, names), what="every other misser polling")

    holders = Loader("the row", during=holders_load)
    results[0] = LeaseCache(r).get_or_fill("user:1", holders)
    for t in threads:
        t.join()
    assert (holders.calls, others_load.calls) == (1, 0)
    assert results == dict.fromkeys(range(n), "the row")


def test_missers_that_stop_waiting_read_through_without_filling(env: Env) -> None:
    r = env.redis()
    n = 6
    results: dict[int, object] = {}

    def miss(i: int) -> None:
        results[i] = LeaseCache(r, wait_ms=0).get_or_fill("user:1", Loader(f"read by {i}"))

    def holders_load() -> None:
        # The others give up at once and each read the database themselves; had one of
        # them filled, the lease would be gone and the holder's fill refused.
        others = [threading.Thread(target=miss, args=(i,)) for i in range(1, n)]
        for t in others:
            t.start()
        for t in others:
            t.join()
        assert is_marker(r.get("user:1"))

    results[0] = LeaseCache(r).get_or_fill("user:1", Loader("read by 0", during=holders_load))
    assert results == {i: f"read by {i}" for i in range(n)}
    assert r.get("user:1") == "read by 0"


def test_a_marker_is_never_taken_for_a_value(env: Env) -> None:
    r = env.redis()
    held = LeaseCache(r).acquire("user:1")
    assert isinstance(held, Lease)
    assert held.marker.startswith(MARKER_PREFIX)
    assert r.get("user:1") == held.marker.decode()  # what a plain GET sees meanwhile
    load = Loader("read through")
    assert LeaseCache(r, wait_ms=0).get_or_fill("user:1", load) == "read through"
    assert load.calls == 1


# --- with the real listener -----------------------------------------------------------------


def test_the_listener_revokes_the_lease_of_a_read_it_made_stale(env: Env) -> None:
    config = setup_users(env, rows=1)
    r = env.redis()
    leases = LeaseCache(r)

    def read_row() -> str:
        email = env.scalar("SELECT email FROM users WHERE id = 1")
        # The row changes and commits after the read, and the listener deletes the key
        # (the lease) before this slow reader fills.
        env.sql("UPDATE users SET email = 'changed@x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1") == 0, what="the listener's UNLINK of user:1")
        return str(email)

    with listening(config):
        assert leases.get_or_fill("user:1", read_row) == "u1@x"
        assert r.exists("user:1") == 0, "the stale row was not cached"
        fresh = leases.get_or_fill(
            "user:1", lambda: str(env.scalar("SELECT email FROM users WHERE id = 1"))
        )
        assert fresh == "changed@x"
        assert r.get("user:1") == "changed@x"


# --- packaging --------------------------------------------------------------------------------

WITHOUT_DJANGO = """
import importlib, pkgutil, sys
sys.modules["django"] = None  # as if not installed: any import of it fails
import cdc_invalidator
for m in pkgutil.walk_packages(cdc_invalidator.__path__, "cdc_invalidator."):
    if m.name != "cdc_invalidator.django" and not m.name.endswith("__main__"):
        importlib.import_module(m.name)
try:
    import cdc_invalidator.django
except ImportError:
    print("ok")
"""


def test_only_the_django_module_needs_django() -> None:
    """Django is an optional extra (cdc-invalidator[django]): every other module
    imports without it."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_DJANGO], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


class Counted(redis.Redis):
    """A client that counts the commands it sends (each one round trip: no pipelines)."""

    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        # redis-py leaves it unannotated (untyped_calls_exclude covers calls, not super()).
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def test_a_hit_is_one_get_and_a_miss_one_round_trip_more(env: Env) -> None:
    """What docs/consistency.md says leases cost."""
    r = Counted(connection_pool=redis.ConnectionPool.from_url(env.redis_url, decode_responses=True))
    r.sent = []
    leases = LeaseCache(r)
    leases.get_or_fill("warm-up", Loader("scripts loaded"))
    r.sent.clear()
    leases.get_or_fill("user:1", Loader("row"))  # a miss: GET, the lease, the fill
    assert r.sent == ["GET", "EVALSHA", "EVALSHA"]
    r.sent.clear()
    leases.get_or_fill("user:1", Loader("unused"))  # a hit
    assert r.sent == ["GET"]
    r.close()
