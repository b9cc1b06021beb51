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


def bulk_limit(client: redis.Redis) -> int | None:
    """The server's proto-max-bulk-len, or None where CONFIG GET is refused (a managed
    Redis, an ACL without it)."""
    try:
        found = client.config_get("proto-max-bulk-len")
    except redis.ResponseError:
        return None
    # (one pair; its name as bytes or str, as the client decodes)
    return next((int(value) for value in found.values() if value is not None), DEFAULT_LIMIT)


def too_long(packed: bytes) -> bool:
    """Whether a packed command may hold a key no Redis takes (then look at them)."""
    return len(packed) > LEAST_LIMIT


# How long the probe waits for Redis to refuse a key's length before it sends the key:
# longer each time the key's write was reset (the answer was on its way, farther away).
REFUSAL_WAITS_S = (0.2, 1.0, 5.0)


def refuses(client: redis.Redis, key: Key) -> bool:
    """Whether Redis refuses `key` for its length, where the limit is not known. Asked
    with an EXISTS of it alone, on a connection of its own (Redis closes the connection
    it refuses a bulk string on: given back to the pool, the next command on it failed,
    as redis_unavailable), made as the pool makes one and connected by its own connect()
    (Sentinel's asks the sentinels for the master: a send on one not connected yet went
    to localhost:6379). Only Redis's answer "invalid bulk length" is a refusal: it comes
    once Redis has read the length, before any ACL check, so the length goes first and
    the key only if no answer came meanwhile. (Sent whole, the write was reset first
    most times, and a reset is no answer: a client evicted, a proxy, a restart; taken
    for a refusal, a key the master holds was left cached.) A reset again at the last
    wait, or Redis failing otherwise, raises: the batch is retried."""
    raw = key if isinstance(key, bytes) else key.encode()
    head = b"*2\r\n$6\r\nEXISTS\r\n$%d\r\n" % len(raw)
    pool = client.connection_pool
    for wait_s in REFUSAL_WAITS_S:
        connection = pool.connection_class(**pool.connection_kwargs)
        try:
            connection.connect()
            connection.send_packed_command([head], False)
            if not connection.can_read(timeout=wait_s):
                connection.send_packed_command([raw, b"\r\n"], False)
            connection.read_response()
        except redis.ResponseError as exc:
            return "invalid bulk length" in str(exc)
        except redis.ConnectionError:
            if wait_s == REFUSAL_WAITS_S[-1]:
                raise
            continue
        finally:
            connection.disconnect()
        return False
    return False  # (not reached: the last wait returns or raises)


def storable(keys: Iterable[Key], limit: int | None, client: redis.Redis) -> list[Key]:
    """`keys` less those Redis refuses for their length (each logged): none of those
    can be cached, so leaving them out deletes nothing that is. Told by `limit`, the
    server's proto-max-bulk-len (bulk_limit()), or where it is not known (None) by asking
    `client` about each key longer than the least limit (sent whatever the limit, such a
    key held every later change behind it, as redis_unavailable: CONFIG refused,
    proto-max-bulk-len 1mb)."""
    kept: list[Key] = []
    for key in keys:
        size = len(key) if isinstance(key, bytes) else len(key.encode())
        if size <= LEAST_LIMIT or (
            size <= limit if limit is not None else not refuses(client, key)
        ):
            kept.append(key)
            continue
        start = key[:SHOWN_CHARS]
        log.warning(
            "key_too_long_for_redis",
            key_starts=start.decode(errors="replace") if isinstance(start, bytes) else start,
            key_bytes=size,
            proto_max_bulk_len=limit if limit is not None else "unknown (CONFIG GET refused)",
            detail="Redis refuses a key this long in every command, so it cannot be "
            "cached: its UNLINK is left out, the other keys are deleted",
        )
    return kept
