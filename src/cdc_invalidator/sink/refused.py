"""An UNLINK the Redis user's ACL refuses, named.

Redis answers an UNLINK of a key outside the user's key patterns (`~user:*` while a
template makes `order:{id}`) with "NOPERM this user has no permissions to access one of
the keys used as arguments": no key is named, and the listener's `redis_unavailable`
(or a sweep's `sweep_failed`) said only that, while the batch (or the sweep) waited for
good (a review). The sinks raise instead a NoPermissionError (still REDIS_REFUSED: the
change waits for the ACL to be fixed, nothing is acknowledged) that names the keys
refused, and for a sweep the pattern that matched them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import hiredis
import redis
from redis.exceptions import NoPermissionError, ResponseError

from cdc_invalidator.sink.glob import GlobSet
from cdc_invalidator.sink.slots import Key, pack_unlinks

SHOWN_KEYS = 5  # named in the message; the rest counted


def _text(value: Key) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def refused(
    exc: NoPermissionError, keys: Sequence[Key], patterns: Collection[bytes] = ()
) -> NoPermissionError:
    """`exc` (a NOPERM reply to an UNLINK) with the keys of that UNLINK it was for
    (those refused, where the sink could tell them apart) and, for a sweep, the
    patterns that matched them: a new error caused by `exc`, or `exc` itself where no
    key is known."""
    if not keys:
        return exc
    shown = ", ".join(repr(_text(key)) for key in keys[:SHOWN_KEYS])
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    matched = sorted(
        {_text(p) for p in patterns for key in keys if GlobSet([p]).matches(_bytes(key))}
    )
    swept = f" (swept for {', '.join(map(repr, matched))})" if matched else ""
    named = NoPermissionError(
        f"{exc}: the Redis user's ACL refused UNLINK of {shown}{more}{swept}; give the "
        "user these keys in its ACL (~pattern, docs/redis.md#acl-users): until then this "
        "change, and every one after it, waits"
    )
    named.__cause__ = exc  # (Redis's own words, for `check`, which names the template)
    return named


def named(exc: ResponseError, keys: Sequence[Key]) -> ResponseError:
    """An error reply to `UNLINK keys`: refused() if it is NOPERM, else as it is."""
    return refused(exc, keys) if isinstance(exc, NoPermissionError) else exc


def narrowed(conn: redis.Connection, keys: Sequence[bytes]) -> list[bytes]:
    """Which of `keys` the ACL refuses, each UNLINKed alone on `conn` (its replies all
    read: it stays in step; those allowed are deleted meanwhile)."""
    conn.send_packed_command([pack_unlinks([[key] for key in keys])])
    refused_keys = []
    for key in keys:
        try:
            conn.read_response()
        except NoPermissionError:
            refused_keys.append(key)
        except ResponseError:
            pass  # (MOVED, ...: not the ACL's)
    return refused_keys


def keys_of(packed: bytes) -> list[bytes]:
    """The keys of one packed `UNLINK key ...` (RESP), read back."""
    reader = hiredis.Reader()
    reader.feed(packed)
    command = reader.gets()
    return list(command[1:]) if isinstance(command, list) else []


def _bytes(key: Key) -> bytes:
    return key if isinstance(key, bytes) else key.encode()
