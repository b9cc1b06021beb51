"""Leases for cache-aside readers: a fill is written only if no invalidation came since
the miss (Facebook, "Scaling Memcache at Facebook", §3.2.1).

The race they close: a reader misses, reads the row, the row changes and commits, the
listener deletes the key, and the reader, slower than all of that, SETs the old value,
which then lives until the row changes again. With a lease the reader's miss writes a
marker into the key itself (b"\\x00cdc-lease:" + a random token, with an expiry), and its
fill replaces the marker only if the key still holds exactly that marker. The listener's
UNLINK (or anyone's delete or SET) removes the marker, so a fill that an invalidation
overtook is refused: the listener needs no change, and every operation touches one key
(a Redis Cluster needs no hash tags).

What makes it sound is the order: the database read must start after the lease is
taken, with a snapshot taken after it (autocommit or READ COMMITTED; a REPEATABLE READ
transaction whose snapshot is older than the lease defeats it). Then a commit the read
missed committed after the lease, and its invalidation revokes the lease before the
fill, or deletes the fill after it like any cached value.

Not using the helper on the same keys: a plain GET returns the marker's bytes while a
fill is under way; a plain SET overwrites the marker (the helper's fill is then
refused); a plain DEL revokes it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster

# No pickle starts with a NUL byte (protocol 2 and later start with b"\x80"; protocols
# 0 and 1 with an opcode, none of which is 0), nor does text, JSON or a number.
MARKER_PREFIX = b"\x00cdc-lease:"

# GET; on a miss take the lease (the key holds our marker for lease_ms). Replies
# {0, value} (a hit), {1} (the lease is ours: new, or still ours from before), {2}
# (another caller holds it) or {3} (our lease from before is gone: revoked or expired).
# KEYS[1] key; ARGV: the prefix, our marker, lease_ms, '1' if the marker is from before.
_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if not v then
  if ARGV[4] == '1' then return {3} end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1}
end
if v == ARGV[2] then return {1} end
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then return {2} end
return {0, v}
"""

# The end of a script that writes a value once its condition held: ARGV[2] the value,
# ARGV[3] the TTL in ms (0: none; a SET without PX drops a lease's expiry). Replies 1.
SET_VALUE_LUA = """
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""

# The fill: the value replaces our marker only while the key still holds it. KEYS[1]
# key; ARGV: our marker, the value, the TTL in ms (0: none). Replies 1 if written, 0 if
# refused.
_FILL = (
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end"""
    + SET_VALUE_LUA
)

# Give a lease back unfilled (the loader failed): delete the key if it holds our marker.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_HIT, _OURS, _GONE = 0, 1, 3  # _ACQUIRE's replies; 2: another caller's lease

Client = redis.Redis | RedisCluster
Key = str | bytes
# What redis-py stores as given (bool excluded: redis-py refuses it).
Storable = bytes | str | int | float | memoryview
V = TypeVar("V", bytes, str, int, float, memoryview)


def is_marker(value: object) -> bool:
    """A lease's marker, as a GET returns it (bytes, or str when decode_responses)."""
    if isinstance(value, bytes):
        return value.startswith(MARKER_PREFIX)
    if isinstance(value, str):
        return value.startswith(MARKER_PREFIX.decode())
    return False


def ttl_ms(ttl: float | timedelta | None, key: Key) -> int:
    """A TTL in seconds (or a timedelta) as whole milliseconds; 0 for none."""
    if ttl is None:
        return 0
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
    ms = round(seconds * 1000)
    if ms < 1:
        raise ValueError(f"ttl for key {key!r} must be at least 1 ms, got {ttl!r}")
    return ms


@dataclass(frozen=True)
class Hit:
    """The key holds a value: as Redis returned it."""

    value: bytes | str


@dataclass(frozen=True)
class Lease:
    """This caller may fill `key` while it still holds `marker`."""

    key: Key
    marker: bytes


@dataclass(frozen=True)
class Busy:
    """Another caller held the lease for as long as this one would wait."""


Lookup = Hit | Lease | Busy


class LeaseCache:
    """Cache-aside with leases on a redis-py client (`redis.Redis` or `RedisCluster`).

    `lease_ms`: how long a lease lasts if its filler never fills (crashed, or slower
    than that: its fill is then refused). `wait_ms`: how long a caller that finds
    another's lease polls for the value before it reads through (calls its loader and
    returns the value without filling). Holds no state but its client and settings:
    one instance serves every thread.
    """

    def __init__(self, client: Client, *, lease_ms: int = 10_000, wait_ms: int = 100) -> None:
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms < 1:
            raise ValueError(f"lease_ms must be a whole number of ms, at least 1: {lease_ms!r}")
        if isinstance(wait_ms, bool) or not isinstance(wait_ms, int) or wait_ms < 0:
            raise ValueError(f"wait_ms must be a whole number of ms, 0 or more: {wait_ms!r}")
        self.client = client
        self.lease_ms = lease_ms
        self.wait_ms = wait_ms
        # EVALSHA, loading the script on a server that lacks it (on a Cluster, SCRIPT
        # LOAD goes to every primary); each call names its one key, so it is routed
        # to that key's node.
        self._acquire = client.register_script(_ACQUIRE)
        self._fill = client.register_script(_FILL)
        self._release = client.register_script(_RELEASE)

    def get_or_fill(
        self, key: Key, loader: Callable[[], V], ttl: float | timedelta | None = None
    ) -> V | bytes | str:
        """The cached value of `key`, or `loader()`'s, cached for `ttl` seconds (None:
        no expiry) if no invalidation of `key` came in between.

        A hit returns what Redis returns (bytes, or str with decode_responses); a miss
        returns the loader's value as it returned it. `loader` is called only once
        the lease is taken (or the wait for another's fill is over): its database
        read must start there.
        """
        ms = ttl_ms(ttl, key)
        value = self.client.get(key)
        if value is not None and not is_marker(value):
            return value
        found = self.acquire(key)
        if isinstance(found, Hit):
            return found.value
        if isinstance(found, Busy):
            return loader()  # read through: this read began after another's lease
        try:
            loaded = loader()
            storable(loaded, key)
        except BaseException:
            self.release(found)
            raise
        self.fill(found, loaded, ms)
        return loaded

    def acquire(self, key: Key, held: Lease | None = None) -> Lookup:
        """After a miss: the value if it arrived, else a lease, waiting up to wait_ms
        while another caller holds one.

        `held`: a lease this caller took before, returned again while the key still
        holds it. Once it is gone (an invalidation revoked it, or it expired) it is not
        taken again, nor a new one: Busy at once. What the caller read under it may be
        stale, and a lease taken now would let that read fill."""
        marker = held.marker if held is not None else MARKER_PREFIX + new_token()
        deadline = time.monotonic() + self.wait_ms / 1000
        delay = 0.002
        while True:
            found = self._lookup(key, marker, again=held is not None)
            left = deadline - time.monotonic()
            if found is None:
                return Busy()
            if not isinstance(found, Busy) or left <= 0:
                return found
            # Poll (the same script: a lease revoked or expired meanwhile becomes ours).
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.025)

    def fill(self, lease: Lease, value: Storable, ttl_ms: int = 0) -> bool:
        """Write `value` if the key still holds the lease; whether it was written."""
        return bool(self._fill(keys=[lease.key], args=[lease.marker, value, ttl_ms]))

    def release(self, lease: Lease) -> None:
        """Give an unfilled lease back, so that the next caller need not wait for it."""
        self._release(keys=[lease.key], args=[lease.marker])

    def _lookup(self, key: Key, marker: bytes, *, again: bool) -> Lookup | None:
        """_ACQUIRE's reply; None: the lease from before (`again`) is gone."""
        reply: Any = self._acquire(
            keys=[key], args=[MARKER_PREFIX, marker, self.lease_ms, "1" if again else "0"]
        )
        if reply[0] == _HIT:
            return Hit(reply[1])
        if reply[0] == _OURS:
            return Lease(key, marker)
        if reply[0] == _GONE:
            return None
        return Busy()


def new_token() -> bytes:
    return secrets.token_hex(8).encode()


def storable(value: object, key: Key) -> None:
    """Refuse, naming the key, a value redis-py would not store as given."""
    if isinstance(value, bool) or not isinstance(value, bytes | str | int | float | memoryview):
        raise TypeError(
            f"the loader for key {key!r} returned {type(value).__name__}: LeaseCache stores"
            " bytes, str, int or float as given (encode other values, e.g. as JSON)"
        )
