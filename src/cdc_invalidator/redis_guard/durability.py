"""How far back a Redis that changed may have gone, from what its servers said at each
identity check (RedisWatch), beside what their persistence settings promise (window.py).

The settings say what a server loses when all goes well: a snapshot every N seconds, an
fsync every second. They say nothing of when it did not:

- a snapshot that fails (a full disk, a file it may not write) leaves the dump from
  before, which a restart loads;
- a server that restarted holds the dump it loaded and saves again only a period later:
  a second crash before then brings the same old dump back once more;
- a replica promoted after its link to the master was down holds only what it received
  before.

So each check records, per server, its durable point: with AOF, the time of the check
(while its writes succeed; else the last check at which they did); with RDB, its last
successful save (`rdb_last_save_time`, less the BGSAVE's duration: it writes the data of
its fork), or the time of the check when nothing changed
since; a server that has not saved since it started holds the dump it loaded, as old as
its predecessor's durable point (carried over). And the
replication offset of each master, for an hour: a promoted replica says where its copy
of the old master's history ends (`second_repl_offset`), and the last check at which the
old master had not gone past that offset is where the writes it lacks may begin. One
whose old master's history (`master_replid2`) no check saw, a replica restarted from its
AOF (which keeps no replid), is assumed to lack an hour's.

Kept in memory: a listener that restarts while Redis changed replays from when the
identity was saved (watch.py), as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cdc_invalidator.durations import format_duration
from cdc_invalidator.redis_guard.window import MARGIN_S, UNKNOWN_PERSISTENCE_S
from cdc_invalidator.sink import ServerState

# How long replication offsets are kept: a promoted replica that lagged longer is
# assumed to have lagged this long.
KEEP_S = UNKNOWN_PERSISTENCE_S
# How many replids are remembered beyond that (a few change per failover or restart).
REPLIDS_KEPT = 64


@dataclass(frozen=True, slots=True)
class Reach:
    """How far back a replay must reach (seconds before now) for one reason."""

    since_s: float
    why: str


class Durability:
    def __init__(self) -> None:
        # By server identity: the unix time up to which its data is on disk (None: not
        # known, as for a Redis before 7.0, which does not count its saves).
        self._durable: dict[str, float | None] = {}
        # The durable point of the servers a change replaced: what a server that has not
        # saved since it started holds.
        self._carried: float | None = None
        # (monotonic time last seen, replid, offset) of each master, in time order; the
        # last entry of an offset that stands still is moved to the latest check.
        self._offsets: deque[tuple[float, str, int]] = deque()
        # The replids seen, longer than their offsets are kept (the newest REPLIDS_KEPT).
        self._replids: deque[str] = deque(maxlen=REPLIDS_KEPT)

    def observe(self, states: Sequence[ServerState], mono: float, wall: float) -> None:
        """Record what the servers said at a check (after reaches(), on a change)."""
        seen = {s.identity for s in states}
        durable = {s.identity: self._durable_of(s, wall) for s in states}
        self._durable = {i: d for i, d in self._durable.items() if i in seen} | durable
        for s in states:
            self._offset(mono, s.replid, s.offset)
            if s.replid not in self._replids:
                self._replids.append(s.replid)
        while self._offsets and self._offsets[0][0] < mono - KEEP_S:
            self._offsets.popleft()

    def reaches(self, states: Sequence[ServerState], mono: float, wall: float) -> list[Reach]:
        """The servers changed to `states`: how far back a replay must reach for what the
        servers they replaced had not made durable, or a promoted replica had not
        received."""
        now = {s.identity for s in states}
        gone = [d for identity, d in self._durable.items() if identity not in now]
        durable = None if not gone or None in gone else min(d for d in gone if d is not None)
        if gone:
            self._carried = durable
        out: list[Reach] = []
        # The new servers: restarted ones loaded a dump (a master with a replica reports
        # the dump's replid and offset as a promoted replica does: both reaches apply,
        # the further wins); one that loaded no keys and keeps no AOF brought nothing back.
        new = [s for s in states if s.identity not in self._durable]
        if durable is not None and any(s.aof or s.loaded_keys != 0 for s in new):
            out.append(
                Reach(
                    wall - durable + MARGIN_S,
                    f"the data on disk of the server(s) replaced dated from "
                    f"{format_duration(max(0.0, wall - durable))} ago",
                )
            )
        for s in states:
            fresh = s.identity not in self._durable
            if s.second_offset >= 0 and (reach := self._promoted(s, mono, fresh)) is not None:
                out.append(reach)
        return out

    def _durable_of(self, s: ServerState, wall: float) -> float | None:
        if s.aof:
            return wall if s.aof_ok else self._durable.get(s.identity)
        if s.saves == 0:
            # Not saved since it started: its disk holds the dump it loaded (its memory
            # too, until it changes: invalidations made before are not in it either).
            # Its predecessor's durable point if we saw it go; else, if it loaded keys,
            # when it started at the latest (a review: a server started from a dump
            # before the listener did, its snapshots then failing, was replayed the
            # settings' 5 s after it crashed onto that dump, and the keys deleted since
            # it started stayed).
            carried = self._carried
            if carried is None and s.loaded_keys != 0:
                carried = s.started_at
            return self._durable.get(s.identity, carried)
        if s.unsaved == 0:
            return wall  # what it holds is what it would load
        return None if s.saves is None else s.saved_at

    def _offset(self, mono: float, replid: str, offset: int) -> None:
        for i in range(len(self._offsets) - 1, -1, -1):
            if self._offsets[i][1] == replid:
                if self._offsets[i][2] == offset:
                    del self._offsets[i]
                break
        self._offsets.append((mono, replid, offset))

    def _promoted(self, s: ServerState, mono: float, fresh: bool) -> Reach | None:
        """A replica promoted: the writes to the master it followed (replid2) from the
        last check that saw it at an offset the replica holds (below second_offset).
        `fresh`: the server is one this change brought (not one seen before)."""
        mine = [(t, offset) for t, replid, offset in self._offsets if replid == s.replid2]
        if not mine:
            if s.replid2 in self._replids:  # seen longer ago than the offsets kept
                return Reach(
                    UNKNOWN_PERSISTENCE_S,
                    "a replica promoted, or a server restarted, from a history last seen "
                    f"more than {format_duration(KEEP_S)} ago: assumed "
                    f"{format_duration(UNKNOWN_PERSISTENCE_S)}",
                )
            if not fresh:
                return None  # promoted before we saw it: the change was another server's
            # A history no check saw. A replica restarted from its AOF forgets which
            # master's it holds (a new random replid, offset 0: Redis keeps them in an
            # RDB only): promoted before it could resync, it reports that random id, and
            # holds what its AOF had, of any age (a review: the listener replayed the
            # settings' 5 s, and keys deleted 10 s before the failover stayed stale).
            return Reach(
                UNKNOWN_PERSISTENCE_S,
                "a replica promoted from a history no check saw (master_replid2 "
                f"{s.replid2}: a replica restarted from its AOF forgets its master's): "
                f"how far it lags is unknown, assumed {format_duration(UNKNOWN_PERSISTENCE_S)}",
            )
        held = [t for t, offset in mine if offset < s.second_offset]
        if held:
            return Reach(
                mono - max(held) + MARGIN_S,
                f"a replica promoted with the old master's writes up to offset "
                f"{s.second_offset - 1}, its offset {format_duration(mono - max(held))} ago",
            )
        return Reach(
            max(UNKNOWN_PERSISTENCE_S, mono - mine[0][0] + MARGIN_S),
            "a replica promoted without the old master's writes of the last "
            f"{format_duration(mono - mine[0][0])} at least: assumed "
            f"{format_duration(UNKNOWN_PERSISTENCE_S)}",
        )
