"""cdc_invalidator.django.LeaseRedisCache through Django's own cache API (`caches[...]`,
CACHES set with override_settings) against the test Redis, and once with the listener.

Django gives each thread its own backend instance: a caller is a thread here
(`in_thread`). Every wait is on an event (a key gone, a client seen polling).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished
from django.test import override_settings

from cdc_invalidator.lease import is_marker
from tests.support.env import Env
from tests.support.listener import listening
from tests.support.sync import install, users_table
from tests.support.waits import wait_until

T = TypeVar("T")
LEASE = "cdc_invalidator.django.LeaseRedisCache"


def backends(url: str) -> dict[str, dict[str, Any]]:
    return {
        "default": {"BACKEND": LEASE, "LOCATION": url},
        # Gives up on another's lease at once: reads through.
        "impatient": {"BACKEND": LEASE, "LOCATION": url, "OPTIONS": {"lease_wait_ms": 0}},
        # Waits for another's fill; named, to be seen polling in CLIENT LIST (an option
        # that goes on to redis-py, beside ours).
        "patient": {
            "BACKEND": LEASE,
            "LOCATION": url,
            "OPTIONS": {"lease_wait_ms": 30_000, "client_name": "patient"},
        },
        "short": {"BACKEND": LEASE, "LOCATION": url, "OPTIONS": {"lease_ms": 300}},
        # Django's own backend on the same keys: a client that does not use the helper.
        "plain": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url},
    }


@pytest.fixture
def r(env: Env) -> Iterator[redis.Redis]:
    if not settings.configured:
        settings.configure()
    with override_settings(CACHES=backends(env.redis_url)):
        client = env.redis()
        yield client
        client.close()


def full(key: str) -> str:
    """The Redis key Django makes of a cache key (no KEY_PREFIX, version 1)."""
    return str(caches["default"].make_key(key))


def in_thread(fn: Callable[[], T]) -> T:
    """Run `fn` as another caller: a thread, with Django's cache instances of its own."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


def test_a_get_miss_takes_a_lease_and_the_set_fills(r: redis.Redis) -> None:
    cache = caches["default"]
    assert cache.get("user:1") is None
    assert is_marker(r.get(full("user:1")))
    cache.set("user:1", {"id": 1, "email": "a@x"}, timeout=30)
    assert cache.get("user:1") == {"id": 1, "email": "a@x"}
    assert 0 < r.pttl(full("user:1")) <= 30_000
    assert in_thread(lambda: caches["default"].get("user:1")) == {"id": 1, "email": "a@x"}


def test_an_invalidation_between_get_and_set_refuses_the_set(r: redis.Redis) -> None:
    cache = caches["default"]
    assert cache.get("user:1") is None
    r.unlink(full("user:1"))  # the listener, between the app's read and its set
    cache.set("user:1", "stale")
    assert r.exists(full("user:1")) == 0
    assert cache.get("user:1") is None  # a new lease
    cache.set("user:1", "fresh")
    assert cache.get("user:1") == "fresh"


def test_a_second_get_after_an_invalidation_takes_no_lease_and_the_set_is_dropped(
    r: redis.Redis,
) -> None:
    """get, the app's read, the listener's UNLINK, get again, set: the value read under
    the first lease may be stale, and is not written under a lease taken again."""
    cache = caches["default"]
    assert cache.get("user:1") is None
    r.unlink(full("user:1"))  # the listener, after the app's read
    assert cache.get("user:1") is None
    assert r.exists(full("user:1")) == 0, "the gone lease taken again"
    cache.set("user:1", "read before the invalidation")
    assert r.exists(full("user:1")) == 0
    assert cache.get("user:1") is None  # a new lease, for a new read
    cache.set("user:1", "fresh")
    assert cache.get("user:1") == "fresh"


def test_get_or_set_goes_through_the_lease(r: redis.Redis) -> None:
    cache = caches["default"]
    calls: list[str] = []

    def load(value: str, invalidate: bool = False) -> Callable[[], str]:
        def loader() -> str:
            calls.append(value)
            if invalidate:
                r.unlink(full("user:1"))
            return value

        return loader

    assert cache.get_or_set("user:1", load("stale", invalidate=True), timeout=60) == "stale"
    assert r.exists(full("user:1")) == 0, "the fill an invalidation overtook was refused"
    assert cache.get_or_set("user:1", load("fresh"), timeout=60) == "fresh"
    assert cache.get_or_set("user:1", load("unused"), timeout=60) == "fresh"
    assert calls == ["stale", "fresh"]
    assert 0 < r.pttl(full("user:1")) <= 60_000
    assert cache.get_or_set("user:2", "a default") == "a default"  # not callable
    assert cache.get("user:2") == "a default"


def test_a_set_with_no_get_before_is_a_plain_set(r: redis.Redis) -> None:
    cache = caches["default"]
    cache.set("user:1", "written")
    assert cache.get("user:1") == "written"
    # Over another caller's lease too: a write-through wins, and that caller's fill is
    # refused.
    assert cache.get("user:2") is None
    in_thread(lambda: caches["default"].set("user:2", "written"))
    cache.set("user:2", "loaded")
    assert cache.get("user:2") == "written"


def test_a_caller_finding_anothers_lease_reads_through_and_its_set_is_dropped(
    r: redis.Redis,
) -> None:
    cache = caches["default"]
    assert cache.get("user:1") is None

    def other() -> object:
        impatient = caches["impatient"]
        found = impatient.get("user:1")
        impatient.set("user:1", "theirs")  # read after our lease: dropped
        return found

    assert in_thread(other) is None
    assert is_marker(r.get(full("user:1")))
    cache.set("user:1", "ours")
    assert cache.get("user:1") == "ours"


def test_a_caller_waits_for_the_fill_of_anothers_lease(r: redis.Redis) -> None:
    cache = caches["default"]
    assert cache.get("user:1") is None
    seen: list[object] = []
    waiter = threading.Thread(target=lambda: seen.append(caches["patient"].get("user:1")))
    waiter.start()
    wait_until(
        lambda: any(c["name"] == "patient" and c["cmd"] == "evalsha" for c in r.client_list()),
        what="the other caller polling the lease",
    )
    cache.set("user:1", "filled")
    waiter.join()
    assert seen == ["filled"]


def test_a_marker_is_never_returned(r: redis.Redis) -> None:
    cache = caches["default"]
    cache.set("user:2", "two")
    cache.set("n", 5)
    assert cache.get("user:1") is None  # our lease on user:1
    ttl = r.pttl(full("user:1"))

    def other() -> None:
        c = caches["impatient"]
        assert c.get("user:1") is None
        assert c.get("user:1", "default") == "default"
        assert c.get_many(["user:1", "user:2"]) == {"user:2": "two"}
        assert c.has_key("user:2")
        assert not c.has_key("user:1")
        assert "user:1" not in c
        with pytest.raises(ValueError, match="not found"):
            c.incr("user:1")
        assert c.incr("n", 2) == 7
        assert c.decr("n") == 6
        assert c.touch("user:1", None) is False  # a lease's expiry is its filler's

    in_thread(other)
    assert 0 < r.pttl(full("user:1")) <= ttl
    # Django's own backend on the same key is not lease-aware: it unpickles the marker.
    with pytest.raises(pickle.UnpicklingError):
        caches["plain"].get("user:1")


def test_add_fills_a_lease_and_treats_anothers_lease_as_absent(r: redis.Redis) -> None:
    cache = caches["default"]
    assert cache.get("user:1") is None
    assert cache.add("user:1", "added", timeout=10) is True  # fills our lease
    assert cache.get("user:1") == "added"
    assert cache.add("user:1", "again") is False  # a value: add refuses
    assert cache.get("user:2") is None  # our lease on user:2
    assert in_thread(lambda: caches["default"].add("user:2", "theirs")) is True
    cache.set("user:2", "ours")  # our lease is gone: refused
    assert cache.get("user:2") == "theirs"
    assert cache.add("user:3", "gone", timeout=0) is True
    assert r.exists(full("user:3")) == 0


def test_timeouts_are_honoured(r: redis.Redis) -> None:
    cache = caches["default"]
    for key, timeout, most in [("a", 5, 5_000), ("b", None, -1), ("c", 300, 300_000)]:
        assert cache.get(key) is None
        if key == "c":
            cache.set(key, "v")  # the default TIMEOUT: 300 s
        else:
            cache.set(key, "v", timeout=timeout)
        assert cache.get(key) == "v"
        ttl = r.pttl(full(key))
        assert ttl == -1 if most == -1 else 0 < ttl <= most
    assert cache.get("d") is None
    cache.set("d", "v", timeout=0)  # Django's "expire at once": the lease given back
    assert r.exists(full("d")) == 0
    assert cache.touch("a", None) is True
    assert r.pttl(full("a")) == -1
    assert cache.touch("b", 20) is True
    assert 0 < r.pttl(full("b")) <= 20_000


def test_a_crashed_callers_lease_expires(r: redis.Redis) -> None:
    assert caches["short"].get("user:1") is None  # and this caller never sets
    assert in_thread(lambda: caches["impatient"].get("user:1")) is None
    wait_until(lambda: r.exists(full("user:1")) == 0, what="the lease expired")

    def other() -> object:
        c = caches["default"]
        assert c.get("user:1") is None
        c.set("user:1", "filled")
        return c.get("user:1")

    assert in_thread(other) == "filled"


def test_the_end_of_a_request_gives_back_unfilled_leases(r: redis.Redis) -> None:
    cache = caches["default"]
    assert cache.get("user:1") is None
    assert cache.get("user:2") is None
    cache.set("user:2", "filled")
    request_finished.send(sender=None)  # Django closes its caches
    assert r.exists(full("user:1")) == 0, "the unfilled lease was given back"
    assert r.exists(full("user:2")) == 1
    cache.set("user:1", "written")  # nothing held any more: a plain set
    assert cache.get("user:1") == "written"


def test_bad_lease_options_are_refused_naming_them(env: Env) -> None:
    if not settings.configured:
        settings.configure()
    bad = {"BACKEND": LEASE, "LOCATION": env.redis_url, "OPTIONS": {"lease_ms": 0}}
    with (
        override_settings(CACHES={"default": bad}),
        pytest.raises(ImproperlyConfigured, match=r"OPTIONS\['lease_ms'\]"),
    ):
        caches["default"]  # creating the backend is what is tested


def test_the_listener_revokes_a_django_lease(env: Env, r: redis.Redis) -> None:
    users_table(env, [(1, "u1@x")])
    config = install(env, {"public.users": [":1:user:{id}"]})  # Django's key for user:1
    cache = caches["default"]
    with listening(config):
        assert cache.get("user:1") is None
        email = env.scalar("SELECT email FROM users WHERE id = 1")
        env.sql("UPDATE users SET email = 'changed@x' WHERE id = 1")
        wait_until(lambda: r.exists(full("user:1")) == 0, what="the listener's UNLINK")
        cache.set("user:1", email)
        assert r.exists(full("user:1")) == 0, "the stale row was not cached"
        assert cache.get_or_set(
            "user:1", lambda: env.scalar("SELECT email FROM users WHERE id = 1")
        ) == ("changed@x")
        assert cache.get("user:1") == "changed@x"
