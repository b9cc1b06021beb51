"""The source mark: which database a Redis was last invalidated from, kept in that Redis.

The marks kept in the database (capture/lineage.py) tell what it lost since the listener
last noted it there. Two cases leave the database nothing to tell, since it is the one
that did not move:

- a primary gone back to after a standby was promoted and served (a failover undone, a
  split brain resolved for the old primary): it never saw the newer timeline. A listener
  that ran on the promoted one and reconnects tells it (the lineage its previous session
  saw); one started afresh, or the other listener of an HA pair, could not;
- a database put (back) in another's place under its name: the original renamed back
  after a copy had served (a rollback undone), or a copy a listener already ran on,
  renamed into place. Its rows were recorded where they are.

Redis holds what readers cached from the other one, so the listener keeps the mark
there: under the server's system identifier, the database's name and the mapping's
fingerprint, the database's oid and the timeline it last invalidated from. At each
connect (to PostgreSQL, or to Redis after an outage) it compares: another oid (another
database under this name) or an older timeline than the mark's owes a sweep of every
watched table, done off the loop by the sweeper. The mark then names this database as
owing that sweep ("unswept") until it is done: a listener stopped before sweeps at its
next start, whichever database it finds (readers may have cached from this one
meanwhile). No mark (a first start; Redis flushed, or restored from before the first;
the key evicted under an allkeys-* policy) owes nothing: the mark travels with what is
cached. A newer timeline (a failover, a point-in-time recovery) is the lineage rules' to
judge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import redis
import structlog

from cdc_invalidator.mapping import Mapper
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.sink import Sink
from cdc_invalidator.sweeper import SweepLater, Ticket

log = structlog.get_logger("cdc_invalidator.redis_guard")

KEY_PREFIX = "cdc_invalidator:source:"
# The mark's last word while the sweep it owes is not done: whatever database a listener
# finds next, it sweeps (the one it owed for was read from meanwhile, and readers may
# have cached from it).
UNSWEPT = "unswept"
# A look PostgreSQL refused is tried again after this, doubling up to the most.
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 300.0


@dataclass(frozen=True, slots=True)
class Source:
    """The database the listener invalidates from, as the source mark names it."""

    system: str  # the server's system identifier
    timeline: int
    name: str  # the database's
    oid: int
    # The listener's mapping (Settings.mapping_fingerprint): listeners of other tables or
    # templates keep marks of their own (a cluster cloned from this one keeps its system
    # identifier; its listener, on a Redis shared with a key space of its own, would
    # otherwise sweep this one's at every connect, and this one its).
    scope: str

    @property
    def key(self) -> str:
        return f"{KEY_PREFIX}{self.system}:{self.name}:{self.scope}"

    @property
    def mark(self) -> str:
        return f"{self.oid} timeline {self.timeline}"

    @property
    def owing(self) -> str:
        """The mark while the sweep it owes is not done."""
        return f"{self.mark} {UNSWEPT}"


def read_source(conn: psycopg.Connection[Any], scope: str) -> Source | None:
    """This database's Source for the mapping `scope`; None where the server withholds
    its lineage (without its system identifier, one cluster's database could not be told
    from another's of the same name)."""
    row = conn.execute(Q.SOURCE_IDENTITY.sql).fetchone()
    if row is None or row[0] is None:
        return None
    lineage, name, oid = row
    system, _, timeline = str(lineage).split()
    return Source(system, int(timeline), str(name), int(oid), scope)


def lost_since(recorded: str, here: Source) -> str | None:
    """Why the database `here` may lack what readers cached where the mark `recorded`
    was written, or None. A mark of another shape is no mark (overwritten)."""
    words = recorded.split()
    if len(words) not in (3, 4) or words[1] != "timeline" or words[3:] not in ([], [UNSWEPT]):
        return None
    try:
        oid, timeline = int(words[0]), int(words[2])
    except ValueError:
        return None
    if words[3:]:
        return (
            f"the sweep of every watched table owed when this Redis was invalidated from "
            f"database oid {oid} (timeline {timeline}) is not known to be done: a listener "
            "stopped before it, and what readers cached since may be of either database"
        )
    if oid != here.oid:
        return (
            f"database {here.name!r} is not the one this Redis was last invalidated from "
            f"(oid {oid}, now {here.oid}): another database took its name since (the "
            "original renamed back after a copy served, or a copy or restore put in its "
            "place), and rows readers cached from the other may be newer or gone here"
        )
    if timeline > here.timeline:
        return (
            f"the server is on timeline {here.timeline}, older than the one this Redis was "
            f"last invalidated from ({timeline}): a primary gone back to after a standby "
            "was promoted and used lacks what was written there"
        )
    return None


class SourceWatch:
    """Compares the source mark when told to (each connect), and writes it once the sweep
    it owed is done. Nothing waits for the mark: Redis refusing the key (an ACL; a full
    Redis under noeviction, whose SET fails though UNLINK works; a key of another type
    that someone else wrote) is said and invalidation goes on, and a PostgreSQL session
    refused for the look is tried again later and later. Raises only what makes Redis
    unavailable to the deletes too (a connection lost, a timeout)."""

    def __init__(self, sink: Sink, mapper: Mapper, scope: str) -> None:
        self._sink = sink
        self._mapper = mapper
        self._scope = scope
        self._due = True  # compare at the next look
        self._owed: Ticket | None = None  # the sweep handed to the sweeper
        self._unsaved: tuple[str, str] | None = None  # (key, mark) not written yet
        self._refused = False  # an ACL: said, and given up
        self._failed_told = False
        # A look PostgreSQL refused (a session, EXECUTE): said once, tried again later.
        self._deferred = False
        self._retry_s = RETRY_FIRST_S
        self._retry_at = 0.0

    def due(self) -> None:
        """Compare again at the next look (a connect: maybe another server)."""
        self._due = True
        self._retry_at = 0.0

    def look(self, connect: Callable[[], psycopg.Connection[Any]], sweep_later: SweepLater) -> None:
        """The mark written once the sweep it owed is done; compared when due."""
        if self._refused:
            return
        if self._owed is not None:
            if not self._owed.done.is_set():
                return
            log.info("source_sweep_done", existed=self._owed.existed)
            self._owed = None
        if self._unsaved is not None and self._write(*self._unsaved):
            self._unsaved = None
        if self._due and time.monotonic() >= self._retry_at:
            self._compare(connect, sweep_later)

    def _compare(
        self, connect: Callable[[], psycopg.Connection[Any]], sweep_later: SweepLater
    ) -> None:
        try:
            with connect() as conn:
                here = read_source(conn, self._scope)
        except psycopg.Error as exc:
            # (a session refused, a role without EXECUTE: tried again later and later,
            # and at the next connect)
            self._retry_at = time.monotonic() + self._retry_s
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            if not self._deferred:
                self._deferred = True
                log.warning("source_check_deferred", error=f"{type(exc).__name__}: {exc}")
            return
        self._deferred, self._retry_s, self._due = False, RETRY_FIRST_S, False
        if here is None:
            return  # (the lineage withheld: the capture says so)
        recorded = self._read(here.key)
        if self._refused:
            return
        reason = None if recorded is None else lost_since(recorded, here)
        if reason is None:
            if recorded != here.mark and not self._write(here.key, here.mark):
                self._unsaved = (here.key, here.mark)
            return
        # Said as owing before the sweep is handed over: a listener stopped before it is
        # done sweeps at its next start, whichever database it finds then. (Not written:
        # said, and the sweep is done all the same.)
        self._write(here.key, here.owing)
        log.error(
            "changes_may_have_been_missed",
            reason=reason,
            action="sweeping every key template of every watched table (off the loop)",
        )
        self._owed = sweep_later(self._mapper.sweep_all())
        self._unsaved = (here.key, here.mark)

    def _read(self, key: str) -> str | None:
        """The mark; None where there is none, or Redis refused it (a key of another
        type is then overwritten)."""
        try:
            return self._sink.read_mark(key)
        except redis.exceptions.ResponseError as exc:  # (NOPERM among them)
            self._failed(key, exc)
            return None

    def _write(self, key: str, value: str) -> bool:
        try:
            self._sink.write_mark(key, value)
        except redis.exceptions.ResponseError as exc:
            self._failed(key, exc)
            return False
        return True

    def _failed(self, key: str, exc: redis.exceptions.ResponseError) -> None:
        if isinstance(exc, redis.exceptions.NoPermissionError):
            self._refused = True
            log.warning(
                "source_mark_refused",
                key=key,
                error=str(exc),
                detail="the Redis user's ACL refuses the listener's own key: a primary "
                "gone back to after a failover, or a database renamed back into place, is "
                "not told (docs/DBA.md, The source mark in Redis); allow GET and SET on "
                f"'{KEY_PREFIX}*' to have it, or set source_mark = false",
            )
        elif not self._failed_told:
            self._failed_told = True
            log.warning(
                "source_mark_failed",
                key=key,
                error=f"{type(exc).__name__}: {exc}",
                detail="Redis refused the listener's own key (a full Redis under "
                "noeviction refuses SET; another client wrote a key of another type "
                "there): invalidation goes on, the mark is tried again",
            )
