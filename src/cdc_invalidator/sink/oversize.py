"""Keys too long for Redis: left out of the UNLINKs, and logged.

Redis refuses, in every command, a bulk string longer than its proto-max-bulk-len
(512 MiB by default, 1 MiB at the least): SET never cached such a key, and an UNLINK
naming one is answered "Protocol error: invalid bulk length" and its connection
closed. Sent anyway, that error came back on every retry and held every change behind
it (a 2 MB `name` under the template `doc:name:{name}`, proto-max-bulk-len 1mb: the
listener logged redis_unavailable for good, and left even the batch's other keys
cached).

No command packed shorter than the least limit can hold such a key, so the sinks look
at the keys only when a packed command is longer than that: the usual batch pays one
len() per command.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
import structlog

from cdc_invalidator.sink.slots import Key

log = structlog.get_logger("cdc_invalidator.sink")

LEAST_LIMIT = 1 << 20  # Redis refuses a lower proto-max-bulk-len
DEFAULT_LIMIT = 512 << 20  # proto-max-bulk-len's default
# The start of a key too long, in its log line (the rest says nothing more).
SHOWN_CHARS = 64


def bulk_limit(client: redis.Redis) -> int:
    """The server's proto-max-bulk-len, or its default where CONFIG GET is refused (a
    managed Redis, an ACL without it): a key under a lower limit then still fails, as
    redis_unavailable, rather than being left cached."""
    try:
        found = client.config_get("proto-max-bulk-len")
    except redis.ResponseError:
        return DEFAULT_LIMIT
    # (one pair; its name as bytes or str, as the client decodes)
    return next((int(value) for value in found.values() if value is not None), DEFAULT_LIMIT)


def too_long(packed: bytes) -> bool:
    """Whether a packed command may hold a key no Redis takes (then look at them)."""
    return len(packed) > LEAST_LIMIT


def storable(keys: Iterable[Key], limit: int) -> list[Key]:
    """`keys` less those longer than `limit` bytes (each logged): none of those can be
    cached, so leaving them out deletes nothing that is."""
    kept: list[Key] = []
    for key in keys:
        size = len(key) if isinstance(key, bytes) else len(key.encode())
        if size <= limit:
            kept.append(key)
            continue
        start = key[:SHOWN_CHARS]
        log.warning(
            "key_too_long_for_redis",
            key_starts=start.decode(errors="replace") if isinstance(start, bytes) else start,
            key_bytes=size,
            proto_max_bulk_len=limit,
            detail="Redis refuses a key this long in every command, so it cannot be "
            "cached: its UNLINK is left out, the other keys are deleted",
        )
    return kept
