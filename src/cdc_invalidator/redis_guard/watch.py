"""The identity watch: delete again what was invalidated recently, when Redis may have
brought it back.

Redis that restarts from an RDB snapshot or an AOF that was not fsynced, or a replica
promoted before it received our last UNLINKs, serves keys the listener had deleted:
stale rows again. The listener notices by asking Redis who it is (run_id and
master_replid from INFO) on every reconnect and every redis_check_interval_ms; when the
answer changes, every key invalidated since shortly before the old server was last seen
(less what its persistence can lose) is deleted again, before anything else; or since
longer ago, when what the servers said at the checks before shows they held less than
that (durability.py: a snapshot that failed, a restart before the next snapshot, a
replica promoted that lagged). The window's sweeps (its TRUNCATEs') go to the sweeper's
thread: a full SCAN of Redis, which held every change behind it when done here.

The same watch keeps, in Redis, which database it was last invalidated from (source.py):
the other way round, what a database that did not move cannot tell.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis
import structlog

from cdc_invalidator.mapping import Mapper, Routed, merge
from cdc_invalidator.redis_guard.durability import Durability, Reach
from cdc_invalidator.redis_guard.identity import IdentityStore
from cdc_invalidator.redis_guard.source import SourceWatch
from cdc_invalidator.redis_guard.window import MARGIN_S, persistence_window
from cdc_invalidator.replay import ReplayResult, replay
from cdc_invalidator.second_deletes import Acknowledged, redo_owed
from cdc_invalidator.sink import Sink
from cdc_invalidator.sink.protocol import ServerState, identity_of
from cdc_invalidator.sweeper import SweepLater, Ticket

log = structlog.get_logger("cdc_invalidator.redis_guard")


class ReplicaNotMaster(redis.exceptions.ReadOnlyError):
    """The server the listener deletes from answered as a replica: a read-only one
    refuses every UNLINK (READONLY), a writable one (replica-read-only no) takes them and
    keeps them to itself, while its master goes on serving the stale keys. Either way
    nothing may be acknowledged: the runner waits, as for an outage, until a master
    answers (a promotion, or redis_url pointed at the master)."""

    def __init__(self, replicas: int, servers: int) -> None:
        which = "the server" if servers == 1 else f"{replicas} of the {servers} servers"
        super().__init__(
            f"{which} redis_url names answered as a replica (INFO replication: role "
            "slave), not a master: our deletes would not reach its master; waiting for a "
            "master (point redis_url at the master, or use redis_sentinels)"
        )


class RedisWatch:
    """Asks Redis who it is; replays the window when it is somebody else.

    `window_s` None: derived from the new server's persistence settings."""

    def __init__(  # noqa: PLR0913 - every option is keyword-only
        self,
        *,
        sink: Sink,
        mapper: Mapper,
        history: Acknowledged,
        connect: Callable[[], psycopg.Connection[Any]],
        window_s: float | None,
        check_every_s: float,
        second_delete_s: float = 0.0,
        source_scope: str | None = None,
    ) -> None:
        self._sink = sink
        self._mapper = mapper
        self._history = history
        self._connect = connect
        self._window_s = window_s
        self._check_every_s = check_every_s
        self._known: str | None = None
        self._announced: str | None = None  # the identity a replay was logged for
        self._known_at = 0.0  # monotonic time the known identity was last confirmed
        self._next_check = 0.0
        self._durability = Durability()
        # Which database this Redis was last invalidated from, kept in it (source.py)
        # under `source_scope`, the mapping's fingerprint; None: source_mark = false.
        self._source = SourceWatch(sink, mapper, source_scope) if source_scope else None
        # A replay's sweeps not done yet: not handed to the sweeper yet, handed over
        # (their tickets); the identity to save once they are done (_sweep_owed).
        self._owed: Routed = {}
        self._handed: list[Ticket] = []
        self._owed_told = False
        self._unsaved: str | None = None
        # second_delete_ms: the second deletes a killed predecessor owed are redone once.
        self._second_delete_s = second_delete_s
        self._predecessor_owed = second_delete_s > 0
        # When to redo them once more (time.monotonic()): a predecessor that acknowledged
        # less than second_delete_s before the redo owed second deletes due after it.
        self._redo_again_at: float | None = None

    def check(
        self,
        *,
        sweep_later: SweepLater,
        force: bool = False,
        settle: Callable[[], None] = lambda: None,
        before_rendering: Callable[[], None] = lambda: None,
    ) -> ReplayResult | None:
        """The replay done, if one was. `settle` is called before a replay reads the
        history: it waits until the history of every batch acknowledged so far is
        written. `before_rendering` is called before the mapping renders the keys of a
        replay or of a redo (the runner's look at the configuration file, which raises
        to stop the listener when the file holds other tables). `sweep_later` takes the
        sweeps of a replay and of the second deletes a predecessor owed (redo_owed), to
        be done off the loop (the sweeper's thread): a full SCAN here would hold every
        change behind it; and those of the source mark, compared after each connect
        (`force`: source.py). Raises what Redis or PostgreSQL raise: the runner
        retries."""
        now = time.monotonic()
        if self._redo_again_at is not None and now >= self._redo_again_at:
            before_rendering()
            self._redo_again(sweep_later)
        if force and self._source is not None:
            self._source.due()  # (a connect: maybe another server, or database)
        if not force and now < self._next_check:
            return None
        result = self._check_identity(now, sweep_later, settle, before_rendering)
        if self._source is not None:
            self._source.look(self._connect, sweep_later)
        return result

    def _check_identity(
        self,
        now: float,
        sweep_later: SweepLater,
        settle: Callable[[], None],
        before_rendering: Callable[[], None],
    ) -> ReplayResult | None:
        """check() once due: who Redis is, and the replay if it is somebody else."""
        states = self._masters()
        identity = identity_of(states)
        wall = time.time()
        self._next_check = time.monotonic() + self._check_every_s
        if identity == self._known:
            self._known_at = now
            self._durability.observe(states, now, wall)
            if self._unsaved is not None and self._sweep_owed(sweep_later):
                self._save_owed()
            return None
        reaches = self._durability.reaches(states, now, wall) if self._known is not None else []
        result = None
        try:
            conn = self._connect()
        except psycopg.OperationalError as exc:
            # A session of its own (max_connections reached, say): the replay waits for
            # the next check, and the batches go on meanwhile, on the listener's sessions,
            # which an error here would have closed.
            log.warning("redis_check_deferred", error=f"{type(exc).__name__}: {exc}")
            return None
        with conn:
            store = IdentityStore(conn)
            saved = store.load()
            if saved is None or saved[0] == identity:
                if saved is None:
                    store.save(identity)
                    log.info("redis_identity_recorded", identity=identity)
            else:
                # Last seen: the in-memory confirmation, or (a listener restarted while
                # Redis changed) when the old identity was saved.
                gone_s = now - self._known_at if self._known is not None else saved[1]
                settle()
                before_rendering()
                result = self._replay(conn, saved[0], identity, gone_s, reaches)
                if result is not None:
                    merge(self._owed, result.owed)
                if self._sweep_owed(sweep_later):
                    store.save(identity)
                    self._unsaved = None
                else:
                    self._unsaved = identity
            if self._predecessor_owed:
                before_rendering()
                self._redo(conn, sweep_later)
        self._known, self._known_at = identity, now
        self._durability.observe(states, now, wall)
        return result

    def _masters(self) -> list[ServerState]:
        """Each server's state; raises ReplicaNotMaster when one answers as a replica,
        before its identity is taken as known: once a master answers, what went to the
        replica meanwhile is replayed, from when a master last answered."""
        states = self._sink.states()
        if replicas := sum(not state.master for state in states):
            raise ReplicaNotMaster(replicas, len(states))
        return states

    def _redo(
        self,
        conn: psycopg.Connection[Any],
        sweep_later: SweepLater,
        *,
        again: bool = False,
    ) -> None:
        """The second deletes a predecessor may have owed, redone (redo_owed); once more
        later if some fell due after now (a handover, or a restart, within
        second_delete_ms of its last batch): then, `again`, a stale SET that landed
        after the first redo, before its time, is deleted as the predecessor would have.
        (That window reaches back past the predecessor's last batches; it takes this
        listener's acknowledged ones too, deleted twice.)"""
        delay = self._second_delete_s
        ago = redo_owed(
            conn, self._history, self._mapper, self._sink, delay, sweep_later=sweep_later
        )
        self._predecessor_owed = False
        self._redo_again_at = None
        if not again and ago is not None and ago < delay:
            self._redo_again_at = time.monotonic() + delay - ago

    def _redo_again(self, sweep_later: SweepLater) -> None:
        """_redo(again=True), in a session of its own. Raises what Redis raises: done
        at the next check."""
        try:
            conn = self._connect()
        except psycopg.OperationalError as exc:
            # (a session of its own refused: the listener's sessions go on, as for a check)
            log.warning("redis_check_deferred", error=f"{type(exc).__name__}: {exc}")
            self._redo_again_at = time.monotonic() + self._check_every_s
            return
        with conn:
            self._redo(conn, sweep_later, again=True)

    def _replay(
        self,
        conn: psycopg.Connection[Any],
        previous: str,
        current: str,
        gone_s: float,
        reaches: list[Reach],
    ) -> ReplayResult | None:
        if self._window_s == 0:
            log.warning("redis_changed", previous=previous, current=current, replay="off")
            return None
        if self._window_s is None:
            lost_s, why = persistence_window(self._sink.persistence())
        else:
            lost_s, why = self._window_s, "replay_window"
        since_s = gone_s + lost_s + MARGIN_S
        for reach in reaches:
            if reach.since_s > since_s:
                since_s, why = reach.since_s, f"{reach.why} (settings: {why})"
        if self._announced != current:  # once, not on every retry of a failed replay
            self._announced = current
            log.warning(
                "redis_changed",
                previous=previous,
                current=current,
                replay_since_s=round(since_s, 1),
                window=why,
                detail="Redis restarted or failed over (or a Cluster's primaries changed): "
                "deleting again every key invalidated since before the old server was last "
                "seen",
            )
        result = replay(conn, self._history, self._mapper, self._sink, since_s, sweep=False)
        log.info(
            "replay_done",
            events=result.events,
            keys=result.keys,
            existed=result.existed,
            skipped=result.skipped,
            duration_s=round(result.seconds, 3),
        )
        return result

    def _sweep_owed(self, sweep_later: SweepLater) -> bool:
        """The replay's sweeps, all in one pass, handed to `sweep_later`; True once none
        is owed. One that fails (a Redis Cluster refuses to sweep while slots migrate:
        keys in flight could be missed) is tried again by the sweeper, while the
        listener's batches go on: a migration can last hours, and every invalidation
        would wait for it. The new identity is saved only once they are done, so a
        listener stopped before owes the whole replay again."""
        swept = bool(self._handed)
        if self._owed:
            self._handed.append(sweep_later(self._owed))
            self._owed, swept = {}, True
        waiting = [ticket for ticket in self._handed if not ticket.done.is_set()]
        error = next((t.error for t in waiting if t.error), None)
        if error is not None and not self._owed_told:
            self._owed_told = True
            log.warning(
                "replay_sweep_deferred",
                error=error,
                detail="the replay's sweeps are tried again until done; changes are "
                "invalidated meanwhile",
            )
        if waiting:
            return False
        if swept:
            existed = sum(ticket.existed for ticket in self._handed)
            log.info("replay_sweep_done", existed=existed, deferred=self._owed_told)
        self._handed, self._owed_told = [], False
        return True

    def _save_owed(self) -> None:
        """Save the identity a replay's deferred sweeps held back (next check if
        PostgreSQL refuses a session now)."""
        try:
            with self._connect() as conn:
                IdentityStore(conn).save(self._unsaved or "")
        except psycopg.OperationalError as exc:
            log.warning("redis_check_deferred", error=f"{type(exc).__name__}: {exc}")
            return
        self._unsaved = None
