"""When keys are deleted, seen through Redis keyspace notifications: the demo's clock."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable

import redis
from redis.client import PubSub

from cdc_invalidator.demo.common import STEP_TIMEOUT_S, DemoError, ms


class DeleteWatch:
    """Records when keys are deleted, from Redis keyspace notifications, in a thread.

    Redis publishes `del` on `__keyspace@0__:<key>` as it runs the listener's UNLINK;
    the thread stamps each with time.perf_counter() as it arrives.
    """

    def __init__(self, port: int, db: int = 0) -> None:
        self._prefix = f"__keyspace@{db}__:"
        self._client = redis.Redis(
            host="127.0.0.1", port=port, db=db, decode_responses=True, socket_timeout=5
        )
        self._pubsub: PubSub = self._client.pubsub()
        self._deleted: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._pubsub.psubscribe(self._prefix + "*")
        # Only once Redis confirmed the subscription can no deletion slip past us.
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            message = self._pubsub.get_message(timeout=1.0)
            if message and message["type"] == "psubscribe":
                break
            if time.monotonic() > deadline:
                raise DemoError("Redis did not confirm the keyspace subscription")
        self._thread = threading.Thread(target=self._listen, name="delete-watch", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            while not self._stop.is_set():
                message = self._pubsub.get_message(timeout=0.1)
                stamp = time.perf_counter()
                if not message or message["type"] != "pmessage" or message["data"] != "del":
                    continue
                key = str(message["channel"]).removeprefix(self._prefix)
                with self._cond:
                    self._deleted.append((stamp, key))
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced by wait(); the thread just ends
            with self._cond:
                self._failure = exc
                self._cond.notify_all()

    def wait(
        self, keys: Iterable[str], since: float, timeout_s: float = STEP_TIMEOUT_S
    ) -> dict[str, float]:
        """When each key was deleted after `since` (perf_counter), waiting for all of them."""
        wanted = set(keys)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                seen = {key: t for t, key in reversed(self._deleted) if t >= since}
                found = {key: seen[key] for key in wanted if key in seen}
                if len(found) == len(wanted):
                    return found
                if self._failure is not None:
                    raise DemoError(f"lost the keyspace notifications: {self._failure}")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(wanted - found.keys())
                    raise DemoError(
                        f"{', '.join(missing)} not deleted within {timeout_s:g} s: "
                        + "; ".join(self._why_not(key, since) for key in missing)
                    )
                self._cond.wait(left)

    def _why_not(self, key: str, since: float) -> str:
        """What became of `key`, which was not seen deleted after `since`: still cached
        (the listener did not delete it), or deleted before `since` (and when), after
        which the listener's own delete found no key and Redis told nobody."""
        try:
            cached = self._client.exists(key) == 1
        except redis.RedisError as exc:
            return f"{key}: Redis did not say whether it is cached ({exc})"
        if cached:
            return f"{key} is still cached"
        before = [t for t, deleted in self._deleted if deleted == key and t < since]
        if not before:
            return f"{key} is not cached, and no delete of it was seen"
        return (
            f"{key} is not cached: its last delete seen came {ms(since - before[-1])} "
            "before the change it waited for"
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
        self._client.close()
