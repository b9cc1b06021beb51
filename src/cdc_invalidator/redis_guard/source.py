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
there: under the server's system identifier and the database's name, the database's oid
and the timeline it last invalidated from. At each connect (to PostgreSQL, or to Redis
after an outage) it compares: another oid (another database under this name) or an older
timeline than the mark's owes a sweep of every watched table, done off the loop by the
sweeper. The mark then names this database as owing that sweep ("unswept") until it is
done: a listener stopped before sweeps at its next start, whichever database it finds
(readers may have cached from this one meanwhile). No mark (a first start; Redis
flushed, or restored from before the first; the key evicted under an allkeys-* policy)
owes nothing: the mark travels with what is cached. A newer timeline (a failover, a
point-in-time recovery) is the lineage rules' to judge.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Source:
    """The database the listener invalidates from, as the source mark names it."""

    system: str  # the server's system identifier
    timeline: int
    name: str  # the database's
    oid: int

    @property
    def key(self) -> str:
        return f"{KEY_PREFIX}{self.system}:{self.name}"

    @property
    def mark(self) -> str:
        return f"{self.oid} timeline {self.timeline}"

    @property
    def owing(self) -> str:
        """The mark while the sweep it owes is not done."""
        return f"{self.mark} {UNSWEPT}"


def read_source(conn: psycopg.Connection[Any]) -> Source | None:
    """This database's Source; None where the server withholds its lineage."""
    row = conn.execute(Q.SOURCE_IDENTITY.sql).fetchone()
    if row is None or row[0] is None:
        return None
    lineage, name, oid = row
    system, _, timeline = str(lineage).split()
    return Source(system, int(timeline), str(name), int(oid))


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
    it owed is done. Raises what Redis raises, but for an ACL that refuses the key, said
    once and given up (nothing else waits for the mark)."""

    def __init__(self, sink: Sink, mapper: Mapper) -> None:
        self._sink = sink
        self._mapper = mapper
        self._due = True  # compare at the next look
        self._owed: Ticket | None = None  # the sweep handed to the sweeper
        self._unsaved: Source | None = None  # the mark to write once it is done
        self._refused = False
        self._deferred = False  # said that PostgreSQL refused the look: once

    def due(self) -> None:
        """Compare again at the next look (a connect: maybe another server)."""
        self._due = True

    def look(self, connect: Callable[[], psycopg.Connection[Any]], sweep_later: SweepLater) -> None:
        """The mark written once the sweep it owed is done; compared when due."""
        if self._refused:
            return
        if self._owed is not None:
            if not self._owed.done.is_set():
                return
            log.info("source_sweep_done", existed=self._owed.existed)
            self._owed = None
        if self._unsaved is not None:
            self._write(self._unsaved.key, self._unsaved.mark)
            self._unsaved = None
        if self._due:
            self._compare(connect, sweep_later)

    def _compare(
        self, connect: Callable[[], psycopg.Connection[Any]], sweep_later: SweepLater
    ) -> None:
        try:
            with connect() as conn:
                here = read_source(conn)
        except psycopg.Error as exc:
            # (a session refused, a role without EXECUTE: tried again at the next look)
            if not self._deferred:
                self._deferred = True
                log.warning("source_check_deferred", error=f"{type(exc).__name__}: {exc}")
            return
        self._deferred = False
        if here is None:
            self._due = False
            return  # (the lineage withheld: the capture says so)
        try:
            recorded = self._sink.read_mark(here.key)
        except redis.exceptions.NoPermissionError as exc:
            self._refuse(here.key, exc)
            return
        reason = None if recorded is None else lost_since(recorded, here)
        if reason is None:
            if recorded != here.mark:
                self._write(here.key, here.mark)
            self._due = False
            return
        # Said as owing before the sweep is handed over: a listener stopped before it is
        # done sweeps at its next start, whichever database it finds then.
        self._write(here.key, here.owing)
        self._due = False
        log.error(
            "changes_may_have_been_missed",
            reason=reason,
            action="sweeping every key template of every watched table (off the loop)",
        )
        self._owed = sweep_later(self._mapper.sweep_all())
        self._unsaved = here

    def _write(self, key: str, value: str) -> None:
        try:
            self._sink.write_mark(key, value)
        except redis.exceptions.NoPermissionError as exc:
            self._refuse(key, exc)

    def _refuse(self, key: str, exc: redis.exceptions.NoPermissionError) -> None:
        self._refused = True
        log.warning(
            "source_mark_refused",
            key=key,
            error=str(exc),
            detail="the Redis user's ACL refuses the listener's own key: a primary gone "
            "back to after a failover, or a database renamed back into place, is not told "
            "(docs/DBA.md, After restoring the database); allow the key pattern "
            f"'{KEY_PREFIX}*' (GET, SET) to have it",
        )
