"""Second deletes (second_delete_ms): every batch's keys deleted again a moment after
the first delete, for the stale-set race (a reader that read the old row before the
change and writes it to the cache after our delete).

Two halves, one rule: the runner's own second deletes, held in memory and done off the
acknowledgement path (SecondDeletes); and those a predecessor may have died owing,
redone once from the history when a listener starts (redo_owed)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import structlog

from cdc_invalidator.capture.rows import Decoded, MapPack
from cdc_invalidator.mapping import (
    Invalidation,
    Mapper,
    PackedKeys,
    Routed,
    pack_keys,
    unpack_keys,
)
from cdc_invalidator.mapping.mapper import Era
from cdc_invalidator.redis_guard.window import MARGIN_S
from cdc_invalidator.replay import History, replay
from cdc_invalidator.sink import REDIS_UNAVAILABLE, Sink
from cdc_invalidator.sweeper import SweepLater

log = structlog.get_logger("cdc_invalidator.second_deletes")

# Second deletes falling due within this of each other are sent together.
SECOND_DELETE_MERGE_S = 0.01
# Keys deleted again per call to the sink (one pipeline of UNLINKs): what is owed is
# unpacked this many at a time.
SECOND_DELETE_GROUP = 10_000


@dataclass(slots=True)
class _Owed:
    """One Redis database's keys owed a second delete, each batch's packed (pack_keys):
    not a str object per key in a merged set. A bulk statement's keys
    are deleted at up to ~900,000 a second, and those of its first delay_s (all of them
    visible at its commit) are owed: ~260,000 keys, which as a merged set of str held
    some 25 MB at once (the listener's RSS, sampled through a streamed 1M-row DELETE)."""

    parts: list[PackedKeys] = field(default_factory=list)

    def add(self, work: Invalidation) -> None:
        if work.keys:
            self.parts.append(pack_keys(work.keys))

    def count(self) -> int:
        return sum(len(unpack_keys(part)) for part in self.parts)

    def groups(self) -> Iterator[Invalidation]:
        """What is owed, at most SECOND_DELETE_GROUP keys at a time (a batch's keys may
        be split between two)."""
        keys: set[str] = set()
        for part in self.parts:
            rest = unpack_keys(part)
            while rest:
                room = SECOND_DELETE_GROUP - len(keys)
                keys.update(rest[:room])
                rest = rest[room:]
                if len(keys) >= SECOND_DELETE_GROUP:
                    yield Invalidation(keys)
                    keys = set()
        if keys:
            yield Invalidation(keys)


class SecondDeletes:
    """The runner's second deletes: (when, what), in the order they fall due. `counted`
    is told how many keys each one found (late stale sets it undid)."""

    def __init__(self, sink: Sink, delay_s: float, counted: Callable[[int], None]) -> None:
        self._sink = sink
        self._delay_s = delay_s  # 0: off
        self._counted = counted
        self._later: deque[tuple[float, dict[int | None, _Owed]]] = deque()

    @property
    def next_due(self) -> float | None:
        """When the next one falls due (time.monotonic()), None when none is owed."""
        return self._later[0][0] if self._later else None

    def add(self, works: Routed, visible_at: float | None = None) -> None:
        """An acknowledged batch's keys, to delete again delay_s after its changes were
        visible (`visible_at`, time.monotonic()), or if that is unknown, after now (the
        first delete). A stale SET comes from a reader that read the old row before the
        change was visible, at most delay_s before it SETs: if the first delete was
        later than that, it came after every such SET, and none is owed (a backlog
        drained more than delay_s after it was written costs no second deletes).

        Keys only: patterns are ignored, a sweep's second sweep being the sweeper's
        (sweeper.py), which holds no batch back."""
        if not self._delay_s or not any(work.keys for work in works.values()):
            return
        now = time.monotonic()
        due = (now if visible_at is None else visible_at) + self._delay_s
        if due <= now:
            return  # the first delete came after every stale SET could land
        if self._later:
            due = max(due, self._later[-1][0])  # in order: a later one is as safe
        if not self._later or due - self._later[-1][0] >= SECOND_DELETE_MERGE_S:
            self._later.append((due, {}))
        # Batches a few ms apart share one second delete: fewer, larger pipelines.
        owed = self._later[-1][1]
        for db, work in works.items():
            if work.keys:
                owed.setdefault(db, _Owed()).add(work)

    def run(self, until: float) -> None:
        """The second deletes due by `until`. Off the acknowledgement path: the batches
        were acknowledged after their first delete. A Redis error leaves the rest for
        the next try."""
        later = self._later
        while later and later[0][0] <= until:
            for db, owed in later[0][1].items():
                for group in owed.groups():
                    self._counted(self._sink.delete_routed({db: group}))
            later.popleft()

    def finish(self, redis_failed: BaseException | None = None) -> int:
        """On shutdown: every second delete owed, done now, unless Redis fails (or
        `redis_failed` says it just did): then those left are given up at once, told
        in the log. Tried on, each would wait out Redis's timeout in turn, minutes past
        the stop request when Redis hangs. The next listener deletes them again from
        the replay history (redo_owed). Returns how many keys were given up."""
        if redis_failed is None:
            try:
                self.run(until=float("inf"))
            except REDIS_UNAVAILABLE as exc:
                redis_failed = exc
        given_up = 0
        if self._later:
            given_up = sum(o.count() for _, owed in self._later for o in owed.values())
            log.warning(
                "second_deletes_given_up",
                keys=given_up,
                error=f"{type(redis_failed).__name__}: {redis_failed}",
                detail="stopping with Redis failing: the next listener deletes them again "
                "from the replay history (unless replay_history = 0)",
            )
            self._later.clear()
        return given_up


class Acknowledged(History, Protocol):
    """A capture mode's history, and when it last acknowledged anything."""

    def acknowledged(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]:
        """history() less the events not acknowledged yet (which the next listener
        deletes itself, with their own second deletes)."""
        ...

    def last_acknowledged_s(self, conn: psycopg.Connection[Any]) -> float | None:
        """Seconds since the listener last acknowledged events, None if it never did."""
        ...


def redo_owed(  # noqa: PLR0913 - `sweep_later` is keyword-only
    conn: psycopg.Connection[Any],
    history: Acknowledged,
    mapper: Mapper,
    sink: Sink,
    delay_s: float,
    *,
    sweep_later: SweepLater,
) -> float | None:
    """The listener before this one may have died owing second deletes (they live in
    memory): delete again what it acknowledged in its last 2 * delay_s (a second delete
    waits up to delay_s past its time while a backlog drains: runner.py). Logical mode knows
    when each batch was acknowledged; trigger mode, when it saved the position past each
    change (progress_v1), and how far it had got (listener_state_v1): the rows it had
    not processed are this listener's to delete, with their own second deletes.

    Sweeps (a TRUNCATE's) are handed to `sweep_later` (the sweeper's thread): a second
    sweep holds nothing, and done here, it would hold every change behind it for a full
    SCAN of Redis before the listener's first batch.

    Returns how long ago the last acknowledgement was (None: never). Less than delay_s
    ago, some of those second deletes fall due after now, and a stale SET may land in
    between: the caller redoes them once more then."""
    ago = history.last_acknowledged_s(conn)
    if ago is None:
        return None  # nothing acknowledged yet
    since_s = max(0.0, ago) + 2 * delay_s + MARGIN_S
    result = replay(conn, _AcknowledgedOnly(history), mapper, sink, since_s, sweep=False)
    if result.owed:
        sweep_later(result.owed)
    log.info(
        "second_deletes_redone",
        since_s=round(since_s, 1),
        events=result.events,
        existed=result.existed,
        sweeps_handed_over=sum(len(work.patterns) for work in result.owed.values()),
        detail="the previous listener may have stopped owing these",
    )
    return ago


@dataclass(frozen=True, slots=True)
class _AcknowledgedOnly:
    """A History of what was acknowledged only: what replay() reads for redo_owed()."""

    of: Acknowledged

    @property
    def history_table(self) -> str:
        return self.of.history_table

    def history(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]:
        return self.of.acknowledged(conn, since_s, map_pack)

    def eras(self, conn: psycopg.Connection[Any]) -> list[Era]:
        return self.of.eras(conn)
