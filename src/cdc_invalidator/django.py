"""LeaseRedisCache: Django's RedisCache whose get-miss-then-set fills only while no
invalidation came in between (the leases of cdc_invalidator.lease). An app changes its
CACHES setting, not its code:

    CACHES = {"default": {
        "BACKEND": "cdc_invalidator.django.LeaseRedisCache",
        "LOCATION": "redis://127.0.0.1:6379/0",
        "OPTIONS": {"lease_ms": 10_000, "lease_wait_ms": 100},  # optional, the defaults
    }}

`get()` on a miss takes a lease on the key; a later `set()`, `add()` or `get_or_set()` of
that key by the same caller (thread) fills it only while the lease holds. A `get()` that
found another caller's lease waits up to lease_wait_ms for its value, then returns a
miss, and that caller's later `set()` of the key is dropped: its read came after the
other's lease, so it reads through without filling. A `set()` with no `get()` miss
before it is a plain SET. A lease's marker is never returned as a value: `get`,
`get_many`, `has_key`, `incr` and `touch` treat it as a missing key.

What each thread holds is forgotten when Django closes its caches at the end of a
request (`close()`, which also gives back leases never filled); outside requests, call
`cache.close()` between units of work.

Only this module imports Django (`pip install cdc-invalidator[django]`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.core.exceptions import ImproperlyConfigured
from redis.commands.core import Script

from cdc_invalidator.lease import (
    MARKER_PREFIX,
    SET_VALUE_LUA,
    Busy,
    Hit,
    Lease,
    LeaseCache,
    Lookup,
    is_marker,
)

# OPTIONS of ours, taken out before the rest go to redis-py's connection pool.
LEASE_MS, LEASE_WAIT_MS = "lease_ms", "lease_wait_ms"
# Keys a thread holds a lease (or a read-through) on, at most: a thread that never
# closes its caches forgets its oldest first (a later set() of that key is then plain).
HELD_MAX = 10_000

# add(): SET unless the key holds a value (a lease's marker is no value). KEYS[1] key;
# ARGV: the marker prefix, the value, the TTL in ms (0: none). Replies 1 if written.
_ADD = (
    """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end"""
    + SET_VALUE_LUA
)

# incr(): INCRBY a key that holds a value; nil for a missing key or a lease.
_INCR = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) == ARGV[1] then return false end
return redis.call('INCRBY', KEYS[1], ARGV[2])
"""

# touch(): a lease's expiry is its filler's, never the app's (PERSIST on a marker would
# make every reader wait on it until the key is deleted). ARGV[2]: seconds, '' to persist.
_TOUCH = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, #ARGV[1]) == ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('PERSIST', KEYS[1]) end
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""


def _ms(timeout: float | None) -> int:
    """A backend timeout (seconds, None: none; 0 handled by the caller) in ms, 0: none."""
    return 0 if timeout is None else int(timeout) * 1000


class LeaseRedisCacheClient(RedisCacheClient):
    """Django's Redis client with leases: the Redis side of LeaseRedisCache. Leases and
    the scripts go to the write server; plain reads wherever Django sends them."""

    def __init__(
        self,
        servers: list[str],
        *,
        lease_ms: int = 10_000,
        lease_wait_ms: int = 100,
        **options: Any,
    ) -> None:
        super().__init__(servers, **options)
        self.lease_ms = lease_ms
        self.lease_wait_ms = lease_wait_ms

    @cached_property
    def leases(self) -> LeaseCache:
        return LeaseCache(
            self.get_client(None, write=True), lease_ms=self.lease_ms, wait_ms=self.lease_wait_ms
        )

    @cached_property
    def _scripts(self) -> tuple[Script, Script, Script]:
        writer = self.get_client(None, write=True)
        return (
            writer.register_script(_ADD),
            writer.register_script(_INCR),
            writer.register_script(_TOUCH),
        )

    # --- the lease protocol, for LeaseRedisCache ---------------------------------------

    def lookup(self, key: str, held: Lease | None) -> Lookup:
        """A hit, else a lease (`held` again if still ours), else Busy: after the wait,
        or at once when `held` is gone (revoked: the set after it is dropped)."""
        value = self.get_client(key).get(key)
        if value is not None and not is_marker(value):
            return Hit(value)
        return self.leases.acquire(key, held)

    def loads(self, value: bytes | str) -> Any:
        return self._serializer.loads(value)  # type: ignore[attr-defined]  # Django's, unstubbed

    def fill(self, lease: Lease, value: Any, timeout: float | None) -> bool:
        if timeout == 0:  # Django's "expire at once": nothing to write
            self.leases.release(lease)
            return False
        dumped = self._serializer.dumps(value)  # type: ignore[attr-defined]  # as above
        return self.leases.fill(lease, dumped, _ms(timeout))

    def release(self, lease: Lease) -> None:
        self.leases.release(lease)

    # --- RedisCacheClient's reads and conditional writes, a marker being no value -------

    def get(self, key: Any, default: Any) -> Any:
        value = self.get_client(key).get(key)
        return default if value is None or is_marker(value) else self.loads(value)

    def get_many(self, keys: Iterable[Any]) -> dict[Any, Any]:
        keys = list(keys)
        values = self.get_client(None).mget(keys)
        return {
            k: self.loads(v)
            for k, v in zip(keys, values, strict=True)
            if v is not None and not is_marker(v)
        }

    def has_key(self, key: Any) -> bool:
        pipe = self.get_client(key).pipeline(transaction=False)
        pipe.exists(key)
        pipe.getrange(key, 0, len(MARKER_PREFIX) - 1)  # the head only, not the value
        exists, head = pipe.execute()
        return bool(exists) and not is_marker(head)

    def add(self, key: Any, value: Any, timeout: Any) -> bool:
        add = self._scripts[0]
        args = [MARKER_PREFIX, self._serializer.dumps(value)]  # type: ignore[attr-defined]
        if timeout == 0:  # Django's: would it have been added? Then gone at once.
            added = bool(add(keys=[key], args=[*args, 0]))
            if added:
                self.get_client(key, write=True).delete(key)
            return added
        return bool(add(keys=[key], args=[*args, _ms(timeout)]))

    def incr(self, key: Any, delta: int) -> Any:
        value = self._scripts[1](keys=[key], args=[MARKER_PREFIX, delta])
        if value is None:
            raise ValueError(f"Key '{key}' not found.")  # Django's own error
        return value

    def touch(self, key: Any, timeout: Any) -> bool:
        seconds = "" if timeout is None else int(timeout)
        return bool(self._scripts[2](keys=[key], args=[MARKER_PREFIX, seconds]))


def _positive_ms(options: Mapping[str, Any], name: str, default: int, least: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ImproperlyConfigured(
            f"LeaseRedisCache: OPTIONS[{name!r}] must be a whole number of ms,"
            f" at least {least}: {value!r}"
        )
    return value


class LeaseRedisCache(RedisCache):
    """A drop-in for django.core.cache.backends.redis.RedisCache with leases."""

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        super().__init__(server, params)
        options = params.get("OPTIONS", {})
        _positive_ms(options, LEASE_MS, 10_000, 1)
        _positive_ms(options, LEASE_WAIT_MS, 100, 0)
        # RedisCache builds its client from _class and OPTIONS on first use; ours takes
        # the lease options out before the rest reach the connection pool.
        self._class = LeaseRedisCacheClient
        self._local = threading.local()

    @property
    def _leased(self) -> LeaseRedisCacheClient:
        client = self._cache
        if not isinstance(client, LeaseRedisCacheClient):
            raise ImproperlyConfigured(
                f"LeaseRedisCache needs LeaseRedisCacheClient, not {type(client).__name__}"
            )
        return client

    def _held(self) -> dict[str, Lease | Busy]:
        """This thread's keys: the lease it holds, or Busy (its set() is dropped)."""
        held: dict[str, Lease | Busy] | None = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = {}
        return held

    def get(self, key: Any, default: Any | None = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        held = self._held()
        mine = held.get(key)
        found = self._leased.lookup(key, mine if isinstance(mine, Lease) else None)
        if isinstance(found, Hit):
            return self._leased.loads(found.value)
        held.pop(key, None)  # re-inserted last: the newest is forgotten last
        held[key] = found
        if len(held) > HELD_MAX:
            del held[next(iter(held))]
        return default

    def set(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> None:
        found = self._held().pop(self.make_and_validate_key(key, version=version), None)
        if found is None:
            super().set(key, value, timeout, version=version)  # write-through
        elif isinstance(found, Lease):
            self._leased.fill(found, value, self.get_backend_timeout(timeout))
        # Busy: read after another caller's lease; dropped.

    def add(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        found = self._held().pop(key, None)
        if found is None:
            return self._leased.add(key, value, self.get_backend_timeout(timeout))
        if isinstance(found, Lease):
            return self._leased.fill(found, value, self.get_backend_timeout(timeout))
        return False

    def get_or_set(
        self,
        key: Any,
        default: Any | Callable[[], Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        missing = object()
        value = self.get(key, missing, version=version)
        if value is not missing:
            return value
        if callable(default):
            default = default()  # after the lease: the read must start after it
        self.set(key, default, timeout=timeout, version=version)
        return default

    def close(self, **kwargs: Any) -> None:
        """Django calls it when a request ends: forget this thread's keys, and give back
        the leases it took and never filled, so that other readers need not wait."""
        held = self._held()
        unfilled = [lease for lease in held.values() if isinstance(lease, Lease)]
        held.clear()
        for lease in unfilled:
            self._leased.release(lease)
        super().close(**kwargs)
