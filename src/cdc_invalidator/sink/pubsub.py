"""The tail's channel: Redis pub/sub between the listener and `cdc-invalidator tail`.

Redis is what both reach, wherever each runs. The listener publishes only while someone
subscribes: it asks PUBSUB NUMSUB at most once per `check_every_s`, and publishes
nothing while the answer is 0, so that nobody tailing costs it one round trip a second
at most (and none while idle). Both ends talk to the server `redis_url` names (through
Sentinel, the master): in a Redis Cluster a PUBLISH reaches the subscribers of every
node, but NUMSUB counts those of the node asked only, so both ask the same node.

A failure here never reaches the listener's loop: the tail is an observer. It is
logged once per outage and the channel is asked again a check later.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import redis
import structlog

from cdc_invalidator.sink.connect import RedisOptions, redis_client
from cdc_invalidator.sink.protocol import REDIS_ERRORS

log = structlog.get_logger("cdc_invalidator.sink.pubsub")

CHECK_EVERY_S = 1.0
# The listener's pub/sub round trips wait this long at most (the tail must not hold up
# invalidation when Redis is slow; the sink's own timeout governs the deletes).
TAP_TIMEOUT_S = 1.0


class TailChannel:
    """The listener's end: whether anyone listens, and publishing to them."""

    def __init__(
        self, options: RedisOptions, name: str, *, check_every_s: float = CHECK_EVERY_S
    ) -> None:
        self.name = name
        timeout = min(options.timeout_s, TAP_TIMEOUT_S)
        self._options = dataclasses.replace(options, timeout_s=timeout)
        self._client: redis.Redis | None = None
        self._check_every_s = check_every_s
        self._next_check = 0.0
        self._listened = False
        self._failing = False

    def wanted(self) -> bool:
        """Whether someone subscribes, as last asked (asked again once `check_every_s`
        has passed): a clock read otherwise."""
        now = time.monotonic()
        if now < self._next_check:
            return self._listened
        self._next_check = now + self._check_every_s
        try:
            counts = self._redis().pubsub_numsub(self.name)
            self._listened = bool(counts and int(counts[0][1]))
            self._ok()
        except REDIS_ERRORS as exc:
            self._listened = False
            self._failed(exc)
        return self._listened

    def publish(self, message: str) -> None:
        try:
            receivers = self._redis().publish(self.name, message)
            self._ok()
        except REDIS_ERRORS as exc:
            self._failed(exc)
            return
        if not receivers:  # the last one left: stop until the next check says otherwise
            self._listened = False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_client(self._options)
        return self._client

    def _ok(self) -> None:
        if self._failing:
            self._failing = False
            log.info("tail_channel_available", channel=self.name)

    def _failed(self, exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "tail_channel_unavailable",
                channel=self.name,
                error=f"{type(exc).__name__}: {exc}",
                detail="invalidation goes on; `tail` shows nothing until it is back",
            )


def subscribe(options: RedisOptions, name: str, *, poll_s: float = 1.0) -> Iterator[str | None]:
    """`tail`'s end: each message published on `name`, as text; None every `poll_s`
    without one (the caller's chance to stop). Raises REDIS_ERRORS when the connection
    fails (the caller says so and subscribes again)."""
    client = redis_client(dataclasses.replace(options, timeout_s=max(options.timeout_s, poll_s)))
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(name)
        while True:
            message = pubsub.get_message(timeout=poll_s)
            if message is None:
                yield None
                continue
            data = message.get("data")
            yield data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    finally:
        pubsub.close()
        client.close()
