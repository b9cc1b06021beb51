"""Logical mode: when a commit the stream hands out is visible to readers.

The WAL sender sends a transaction once its commit record is flushed here; the
committing backend becomes visible to other sessions only after that, when it leaves the
proc array. Without a synchronous standby that follows within microseconds. With one
(synchronous_standby_names set), the backend first waits for the standby to confirm the
commit (with remote_apply, to replay it), for as long as the standby takes: a standby
that is down holds every such commit until it is back. Keys deleted meanwhile were
cached again by readers, who still read the old row, and nothing deleted them again (a
review: a commit held 2 s, deleted twice before anyone could see it, and both a plain
reader's SET and a lease's fill of the old row stayed).

So while commits may wait for a synchronous standby, a batch is handed out only once a
snapshot saw each of its transactions complete (`Visibility.seen`): its first delete
then comes after the change is visible, as in trigger mode, and its second delete is
timed from that snapshot. The check is one round trip on the bookkeeping connection
per batch, and none at all on a server without synchronous standbys. Not where the
listener's own stream may be chosen a synchronous standby (`*`, or its name, which
`check` reports and the listener logs as an error, at start and whenever the setting
comes to name it): a commit may then wait for the listener to confirm it, which the
listener does after deleting its keys, so waiting for it to be visible first would
never end. There the keys may go before the commit is visible (a review saw a reader's
refill stay once), which is why it is an error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from cdc_invalidator.pg.queries import Q
from cdc_invalidator.pg.standbys import names_standby

log = structlog.get_logger("cdc_invalidator.capture.visibility")

XID_MASK = (1 << 32) - 1
# Checks while a batch's commits are not visible yet: the first at once, then after
# this long, doubling up to RECHECK_MAX_S (a synchronous standby's round trip is a
# millisecond or so; one that is down may take minutes).
RECHECK_FIRST_S = 0.001
RECHECK_MAX_S = 0.05
# A batch that waits this long for its commits is logged (a standby down, or slow).
WARN_AFTER_S = 5.0


def _precedes(a: int, b: int) -> bool:
    """a is older than b, in PostgreSQL's circular 32-bit xid order."""
    return a != b and ((a - b) & XID_MASK) >= 1 << 31


@dataclass(frozen=True, slots=True)
class Complete:
    """The transactions a snapshot saw complete (its xmin, xmax and in-progress xids, to
    32 bits as the stream's xids are), and when (time.monotonic(), taken after the
    answer came: later than the snapshot, so an upper bound of when they were visible)."""

    at: float
    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str, at: float) -> Complete:
        xmin, xmax, xip = text.split(":")
        return cls(
            at,
            int(xmin) & XID_MASK,
            int(xmax) & XID_MASK,
            frozenset(int(x) & XID_MASK for x in xip.split(",") if x),
        )

    def has(self, xid: int) -> bool:
        """Whether the transaction `xid` had ended (committed, for one streamed) when
        the snapshot was taken. xids wrap around at 2^32: compared as PostgreSQL does."""
        if _precedes(xid, self.xmin):
            return True
        return _precedes(xid, self.xmax) and xid not in self.xip


class Visibility:
    """What the bookkeeping connection's snapshots say is complete, and whether commits
    may wait for a synchronous standby (then `seen` gates each batch)."""

    def __init__(self, side: psycopg.Connection[Any], application_name: str) -> None:
        self._side = side
        self._application_name = application_name
        # Commits may be streamed before they are visible, for longer than a moment.
        self.gated = False
        self._recheck_at: float | None = None  # a batch waits: look again then
        self._pause = RECHECK_FIRST_S
        self._since = 0.0  # when the batch began to wait
        self._named = False  # the setting may make the listener's stream a standby (said)
        self._warned = False

    def now(self) -> tuple[float, Complete] | None:
        """The server's clock (Unix time) and what a snapshot taken now sees complete
        (one round trip), telling too whether commits may wait for a standby."""
        row = self._side.execute(Q.SERVER_CLOCK.sql).fetchone()
        if row is None:
            return None
        names = str(row[2] or "")
        named = names_standby(names, self._application_name)
        if named and not self._named:
            log.error(
                "synchronous_standby_candidate",
                synchronous_standby_names=names,
                application_name=self._application_name,
                detail="PostgreSQL may make the listener's stream a synchronous standby: "
                "every commit of the server would then wait for the listener, and the "
                "listener cannot wait for a commit to be visible before deleting its keys "
                "(it would wait for itself): a reader may cache the old row again between "
                "the delete and the commit, until the second delete. Name the standbys "
                'themselves in synchronous_standby_names instead of "*" or this name',
            )
        self._named = named
        gated = bool(names.strip()) and not named
        if gated != self.gated:
            self.gated = gated
            if not gated:
                self.settled()  # (a batch that waited goes out as it is)
            log.info(
                "commits_seen_before_deletes" if gated else "commits_deleted_as_streamed",
                synchronous_standby_names=names,
                detail="commits may wait for a synchronous standby before they are visible: "
                "each batch's keys are deleted once a snapshot saw its commits complete"
                if gated
                else "no synchronous standby: a commit is visible as it is streamed",
            )
        return float(row[0]), Complete.parse(row[1], time.monotonic())

    def complete(self) -> Complete | None:
        """What a snapshot taken now sees complete."""
        got = self.now()
        return None if got is None else got[1]

    def seen(self, xids: Sequence[int]) -> float | None:
        """When a snapshot taken now saw every transaction of `xids` complete, None if
        it did not: then the next look is due at `recheck_at`. A wait of WARN_AFTER_S
        is logged (once), and its end."""
        complete = self.complete()
        now = time.monotonic()
        if complete is not None and all(complete.has(xid) for xid in xids):
            if self._warned:
                log.warning("commits_visible", xids=list(xids), waited_s=now - self._since)
            self.settled()
            return complete.at
        if self._recheck_at is None:
            self._since = now
            log.debug("commits_not_visible_yet", xids=list(xids))
        elif not self._warned and now - self._since >= WARN_AFTER_S:
            self._warned = True
            log.warning(
                "commits_not_visible",
                xids=list(xids),
                waited_s=now - self._since,
                detail="streamed, but not visible to other sessions yet: they wait for a "
                "synchronous standby (synchronous_standby_names). Their keys are deleted "
                "once they are visible (deleted now, readers would cache the old rows "
                "again); nothing after them is invalidated meanwhile",
            )
        self._recheck_at = now + self._pause
        self._pause = min(2 * self._pause, RECHECK_MAX_S)
        return None

    def settled(self) -> None:
        """No batch waits (one went out): nothing to look at again, and the next wait
        is told anew."""
        self._recheck_at = None
        self._pause = RECHECK_FIRST_S
        self._warned = False

    @property
    def recheck_at(self) -> float | None:
        """When a batch waiting for its commits to be visible is looked at again."""
        return self._recheck_at
