"""Whether Redis holds a key now, and for how long (`explain`): EXISTS and PTTL in the
logical database the key's table uses, or on the cluster node that owns its slot."""

from __future__ import annotations

from dataclasses import dataclass

from cdc_invalidator.sink.auto import AutoSink
from cdc_invalidator.sink.redis_sink import RedisSink


@dataclass(frozen=True, slots=True)
class KeyState:
    exists: bool
    ttl_s: float | None  # None: no expiry (or the key does not exist)


def key_state(sink: AutoSink, key: str, db: int | None) -> KeyState:
    """EXISTS and PTTL of `key` in database `db` (None: redis_url's); REDIS_ERRORS as the
    sink raises them."""
    target = sink.sink
    client = target.for_db(db).client if isinstance(target, RedisSink) else target.client
    exists = bool(client.exists(key))
    ttl_ms = int(client.pttl(key)) if exists else -2
    return KeyState(exists, ttl_ms / 1000 if ttl_ms >= 0 else None)
