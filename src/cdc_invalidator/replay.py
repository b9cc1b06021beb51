"""Replay: delete again the keys of every event invalidated in a recent window.

What was invalidated is read back from PostgreSQL by the capture mode (the trigger
queue's rows, kept for replay_history after they are processed, or history_v1 in logical
mode), decoded as the listener decodes them (capture/rows.py; packs and items of
changes gathered column-wise mapped a template at a time, as live): a row it would
dead-letter is skipped and logged, since a replay that stopped on it would stop the
listener at every start. Who replays, and when: redis_guard/watch.py (Redis came back
as another server), second_deletes.py (what a predecessor owed) and
`cdc-invalidator replay --since 15m`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import structlog

from cdc_invalidator.capture.rows import Decoded, MapPack
from cdc_invalidator.events import Pack
from cdc_invalidator.mapping import Invalidation, Mapper, Routed, merge
from cdc_invalidator.mapping.mapper import Era
from cdc_invalidator.sink import Sink

log = structlog.get_logger("cdc_invalidator.replay")

# Skipped rows logged one by one per replay; the rest are counted.
SKIPS_LOGGED = 20


class History(Protocol):
    """What was invalidated, as a capture mode keeps it (modes/)."""

    @property
    def history_table(self) -> str:
        """Where it is kept: what a skipped row's log line names."""
        ...

    def history(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]:
        """The events invalidated in the last `since_s` seconds (by the server's clock), in
        chunks, oldest first, with the rows that are no events. `map_pack`, if given, is
        offered each pack of changes (column-wise) first: one it maps gives no events."""
        ...

    def eras(self, conn: psycopg.Connection[Any]) -> list[Era]:
        """The templates earlier mappings gave tables the configuration's mapping renders
        otherwise (trigger_sql.mapping_eras_of)."""
        ...


@dataclass(frozen=True, slots=True)
class ReplayResult:
    events: int  # read back from the history
    keys: int  # distinct keys (and patterns) deleted again, per chunk
    existed: int  # how many of them Redis held: what the replay undid
    # Rows, or events, that could not be decoded or no longer map to keys (their table
    # left the configuration): each logged (the first SKIPS_LOGGED), none replayed.
    skipped: int
    seconds: float
    # Sweeps (TRUNCATE, changes that could not be rendered) left to the caller
    # (replay(sweep=False)): every pattern of the window, for one pass.
    owed: Routed = field(default_factory=dict)


def replay(  # noqa: PLR0913 - `sweep` is keyword-only
    conn: psycopg.Connection[Any],
    history: History,
    mapper: Mapper,
    sink: Sink,
    since_s: float,
    *,
    sweep: bool = True,
) -> ReplayResult:
    """Delete the keys of every event invalidated in the last `since_s` seconds. A row
    that is no event, or an event that maps to no keys, is skipped and logged: the
    others are replayed all the same. The window's sweeps are done last, all in one
    pass, or with `sweep=False` left to the caller (ReplayResult.owed).

    A change of a table whose templates an install replaced (`a:{id}` by `b:{id}`) is
    rendered with the earlier ones too, whenever in the window it was captured: a
    restored snapshot may hold `a:N` from before that install (before, only `b:N` was
    deleted again). Those captured after the install delete an `a:N` in vain."""
    started = time.monotonic()
    eras = history.eras(conn)
    events = keys = existed = 0
    owed: Routed = {}
    skips = _Skips(history.history_table)
    # Packs (a bulk statement's, a large transaction's) mapped column-wise, as the
    # listener maps them live: no event per change (a 100k-change logical replay decoded
    # each gathered item into events, 2.4x its floor, which reads the arrays).
    premapped: Routed = {}

    def map_pack(pack: Pack) -> bool:
        # (one an era cannot map column-wise comes back as events, for both to map)
        return mapper.map_pack(pack, premapped) and all(
            era.mapper.map_pack(pack, premapped) for era in eras if pack.table in era.tables
        )

    for chunk in history.history(conn, since_s, map_pack):
        for position, reason in chunk.dead:
            skips.add(position, reason)
        works, failed = mapper.map_all(chunk.events)
        for era in eras:
            era.add_keys(chunk.events, works)
        merge(works, premapped)
        premapped.clear()
        for event, exc in failed:
            skips.add(event.position, str(exc))
        events += len(chunk.events) + chunk.mapped_changes
        keys += sum(len(w) for w in works.values())
        for db, work in works.items():
            if work.patterns:
                owed.setdefault(db, Invalidation()).patterns.update(work.patterns)
                work.patterns = set()
        existed += sink.delete_routed(works)
    skips.close()
    if sweep and owed:
        existed += sink.delete_routed(owed)
        owed = {}
    return ReplayResult(events, keys, existed, skips.count, time.monotonic() - started, owed)


class _Skips:
    """A replay's skipped rows: counted, and logged up to SKIPS_LOGGED (a table that left
    the configuration can leave a million history rows behind)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.count = 0

    def add(self, position: int, reason: str) -> None:
        self.count += 1
        if self.count <= SKIPS_LOGGED:
            log.warning("replay_skipped", source=self.source, row=position, reason=reason)

    def close(self) -> None:
        if self.count > SKIPS_LOGGED:
            log.warning(
                "replay_skips_not_logged",
                source=self.source,
                skipped=self.count,
                not_logged=self.count - SKIPS_LOGGED,
            )
