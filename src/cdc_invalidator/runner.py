"""The listener loop: take a batch, map it to keys, delete them, then acknowledge.

The runner owns reconnects, back-off and shutdown. It acknowledges a batch only after
Redis confirmed every delete (a failure rolls the batch back for another try), so every
committed change is invalidated at least once whatever goes down in between. A batch's
sweeps (patterns) go to the sweeper (sweeper.py) instead, the batch held: the loop goes
on with later batches, and the source acknowledges nothing from the held batch on until
its sweep is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, assert_never, cast

import psycopg
import redis
import structlog

from cdc_invalidator.backoff import Backoff
from cdc_invalidator.capture.errors import Fatal, Standby
from cdc_invalidator.capture.holds import Hold
from cdc_invalidator.events import ChangeEvent, InvalidEvent, Origin, StandInKind, TableName
from cdc_invalidator.mapping import Invalidation, Mapper, Routed
from cdc_invalidator.mapping.mapper import NotConfigured, StoodIn, merge
from cdc_invalidator.metrics import Metrics
from cdc_invalidator.redis_guard.watch import RedisWatch
from cdc_invalidator.second_deletes import SecondDeletes
from cdc_invalidator.shutdown import Stopper
from cdc_invalidator.sink import REDIS_UNAVAILABLE, Sink, SweepSink
from cdc_invalidator.sweeper import Sweeper

log = structlog.get_logger("cdc_invalidator.runner")

# How often an "alive and working" line is logged, whatever the rate.
PROGRESS_EVERY_S = 60.0
# A PostgreSQL connection that lasted this long was healthy: its loss starts the
# reconnects' back-off over.
HEALTHY_CONNECTION_S = 10.0
# A table whose changes cannot be rendered is swept at every batch: log each reason this
# often,
UNRENDERABLE_LOG_EVERY_S = 60.0
# and at most this many reasons of a table in that time (an INSERT's and an UPDATE's give
# two; in logical mode any role may make reasons up): a table's lines stay bounded in
# number, and what is remembered of them in size.
UNRENDERABLE_REASONS_TOLD = 8
# Dead letters, each kept with its error in dead_letter_v1 and counted: a line for each
# error once a minute, at most this many errors a minute (a table dropped from the
# configuration, install not run, made a line per write: 5,000 in 2.5 s).
DEAD_LETTER_LOG_EVERY_S = 60.0
DEAD_LETTER_ERRORS_TOLD = 8
# Batches of this many changes mean a busy database: the runner lingers its full
# linger_s between them (fewer, fuller batches).
BUSY_BATCH = 8


class _Told:
    """What was logged lately of one kind of line: each detail (a reason, an error) once
    every `every_s`, at most `most` details in that time (the rest held back and
    counted), so that the lines stay bounded in number whatever the write rate, and
    what is remembered of them in size."""

    __slots__ = ("_at", "_every_s", "_most", "held")

    def __init__(self, every_s: float, most: int) -> None:
        self._every_s = every_s
        self._most = most
        self._at: dict[str, float] = {}  # each detail told lately: when (time.monotonic())
        self.held = 0  # lines held back since the last one told

    def tell(self, detail: str) -> int | None:
        """None: hold this line back; else log it, with the count this returns: the lines
        held back before it."""
        now = time.monotonic()
        self._at = {d: at for d, at in self._at.items() if now - at < self._every_s}
        if detail in self._at or len(self._at) >= self._most:
            self.held += 1
            return None
        self._at[detail] = now
        held, self.held = self.held, 0
        return held

    def __len__(self) -> int:
        return len(self._at)


class Batch(Protocol):
    """Changes taken from a source, acknowledged by a clean exit from Source.batch().
    Each field means the same in both capture modes."""

    @property
    def size(self) -> int:
        """How many changes the batch took: its events, plus those that could not be
        decoded (dead letters without an event). 0: nothing new."""

    @property
    def events(self) -> list[ChangeEvent]:
        """The decoded changes, to map to keys and delete."""

    @property
    def dead(self) -> dict[int, str]:
        """Dead letters, position -> reason: changes that could not be decoded (put
        here by the source) or mapped (by dead_letter()). A position is the event's
        ChangeEvent.position, or the one an undecodable change would have had. The
        source saves them when the batch is acknowledged."""

    @property
    def ages_s(self) -> list[float]:
        """How long before `read_at` each transaction with changes for us recorded
        them, in seconds by the server's clock. Recorded means what each mode can see:
        the commit in logical mode, the start of the writer's transaction in trigger
        mode (queue rows carry the writer's now()). One per transaction: in logical mode
        in the batch that reads its commit; in trigger mode in the batch that holds its
        rows (every row read is committed), so one larger than a batch counts in each of
        its batches. Once acknowledged, plus the time since `read_at`: the
        commit-to-delete lag. Empty in a batch of size 0: caught up."""

    @property
    def oldest_s(self) -> float | None:
        """How long before `read_at` the oldest transaction the batch holds changes of
        was recorded; None if it holds none. Unlike `ages_s`, this counts a transaction
        whose commit the batch has not reached yet (logical mode streams a large one in
        pieces): a batch held up is behind from its first change, not its last commit."""

    @property
    def visible_at(self) -> float | None:
        """When (time.monotonic()) every change of the batch was certainly visible to a
        reader's new snapshot; None if unknown. Trigger mode: when the snapshot the rows
        were read in was taken. Logical mode: when the stream started, for the backlog
        that had committed before; for a commit streamed since, while a synchronous
        standby may hold commits back, when a snapshot saw it complete (the batch is
        handed out only then: capture/visibility.py); else None (visible a moment after
        it is streamed). A second delete is due second_delete_s after this (or after the
        first delete when None), and not at all if that is past."""

    @property
    def read_at(self) -> float:
        """When the batch was read (time.monotonic()): the instant `ages_s` refer to."""

    def dead_letter(self, position: int, error: str) -> None:
        """Park the event at `position` (see `dead`), saved on acknowledgement."""

    def origins(self) -> list[Origin]:
        """Each event's commit time and transaction, in the order of `events`: for the
        tail (tools/tap.py), computed only when asked. The commit is what `ages_s`
        measures from (the start of the writer's transaction in trigger mode)."""

    def hold(self) -> Hold:
        """Acknowledge in two steps: taken before a clean exit, the batch is handed back
        (the source reads on past it: deleted) but nothing from it on is acknowledged
        (saved, pruned, confirmed to the slot) until the hold is released (its sweep is
        done). Holds are released in the order they were taken."""


class Premapped(Protocol):
    """A batch that also carries keys its source rendered already: logical mode's
    transaction streamed before its commit, whose keys were computed as it came and are
    handed out once it committed, without an event per change. Told apart by the
    attribute (premapped_of), not isinstance(): on Python 3.11 an isinstance() against a
    runtime-checkable Protocol costs ~12 us of CPU, as much as a small batch's mapping."""

    @property
    def premapped(self) -> Routed: ...


class Pipelined(Protocol):
    """A batch whose acknowledgement records nothing a lost delete would make wrong:
    logical mode's share of a streamed transaction before its last (the slot is told
    its commit only with the last, and a restart sends all of it again). Its deletes may
    be confirmed with a later batch's (Sink.delete_routed `later`), so that Redis works
    on them while the loop prepares the next. Told apart by the attribute
    (confirm_later_of), as Premapped batches are."""

    @property
    def confirm_later(self) -> bool: ...


class Early(Protocol):
    """A batch of changes deleted ahead of the batch that acknowledges them (trigger
    mode's NOTIFY payloads: capture/early.py), which the source hands out next. It
    acknowledges nothing: a clean exit tells the source which deletes Redis confirmed,
    so that the acknowledging batch does not delete them again; its changes, their lag
    and dead letters are that batch's (its `oldest_s` counts in how far behind the
    listener is, /readyz, as any batch's does). A change the mapper refuses
    (dead_letter()) is left to that batch, and so is every change of one that needs a
    sweep (leave()). Told apart by its leave() (early_of), as Premapped batches are by
    their attribute."""

    def leave(self) -> None: ...


class Source(Protocol):
    """A connected capture: the trigger queue or the logical stream.

    Each turn of the runner's loop takes a batch, calls maintain(), then either lingers
    (busy) or calls wait() (quiet). How the source is woken (NOTIFY or polling, in
    trigger mode) is its own business, decided from the batches it hands out."""

    def batch(self, limit: int) -> AbstractContextManager[Batch]:
        """Up to `limit` changes. A clean exit acknowledges them (Redis confirmed their
        deletes); an exception does not, and the same changes come again."""

    def maintain(self) -> None:
        """Housekeeping that is due (saving progress, pruning, status updates,
        heartbeats), on every turn: cheap when nothing is."""

    def settle(self) -> None:
        """Wait until what the acknowledged batches leave behind is written: logical
        mode's replay history is written behind the loop. A replay reads that history,
        so it settles first: a batch whose keys were deleted but whose history was still
        queued would otherwise not be deleted again after a Redis snapshot restore."""

    def wait(self, timeout_s: float, wakeup_fd: int | None = None) -> None:
        """Only wait: until woken (new changes, or `wakeup_fd` readable: shutdown) or
        timeout_s; at once if more is already there to read, and no later than
        maintain() has something due."""

    def close(self) -> None:
        """Save what can be saved if the connection still works, then close it."""


class Tap(Protocol):
    """Who watches acknowledged batches (`tail`: tools/tap.py), and Early ones once their
    keys are deleted (the batch that acknowledges them then leaves them out). Called
    after each one with changes; must cost next to nothing when nobody watches, and
    never raise."""

    def after(self, batch: Batch) -> None: ...
    def close(self) -> None: ...


def early_of(batch: Batch) -> Early | None:
    """`batch` as an Early batch, None for any other."""
    return cast(Early, batch) if hasattr(batch, "leave") else None


def premapped_of(batch: Batch) -> Routed | None:
    """The keys a Premapped batch carries, None from any other batch."""
    premapped: Routed | None = getattr(batch, "premapped", None)
    return premapped


def confirm_later_of(batch: Batch) -> bool:
    """Whether the batch's deletes may be confirmed with the next batch's (Pipelined)."""
    later: bool = getattr(batch, "confirm_later", False)
    return later


def split_sweeps(works: Routed) -> tuple[Routed, Routed]:
    """A batch's keys (deleted by the loop) and its patterns (swept behind it)."""
    keys: Routed = {db: Invalidation(keys=w.keys) for db, w in works.items()}
    sweeps: Routed = {
        db: Invalidation(patterns=w.patterns) for db, w in works.items() if w.patterns
    }
    return keys, sweeps


class ConfigurationChanged(Exception):
    """The configuration file no longer holds the tables the listener was started with
    (seen before a batch acknowledges or a replay renders, or at a change only the new
    ones may render): the listener stops, nothing of a batch acknowledged, so that it
    starts again with the file (a service manager's restart) and reads what is left
    through it."""


def stale_mapping(failed: list[tuple[ChangeEvent, InvalidEvent]], works: Routed) -> str | None:
    """What in a mapped batch a newer mapping may know: a change of a table the mapping
    does not name, or one that lacks a key column (swept: events.StandInKind.UNRENDERABLE);
    None when there is no such change."""
    for _event, exc in failed:
        if isinstance(exc, NotConfigured):
            return str(exc)
    for work in works.values():
        for (_table, kind), seen in work.stood_in.items():
            if kind is StandInKind.UNRENDERABLE:
                return seen.detail
    return None


def linger_for(taken: int, linger_s: float) -> float:
    """How long the batch after one of `taken` changes (2 or more) may gather: linger_s
    once batches hold BUSY_BATCH changes, less before. A busy database thus pays the
    fixed cost of a batch (two round trips, about 1 ms of CPU between the listener and
    its backend on 2 cores) once per many changes, while two changes that happened to
    commit together in a quiet period delay the next one only briefly."""
    return linger_s * min(1.0, (taken - 1) / (BUSY_BATCH - 1))


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    batch_size: int = 5000
    poll_interval_s: float = 1.0
    retry_initial_s: float = 0.1
    retry_max_s: float = 1.0
    linger_s: float = 0.02
    second_delete_s: float = 0.0  # 0: off


# During an outage, another error than the one told is told too, at most this often.
RETELL_AFTER_S = 10.0


class Availability:
    """Logs one line when a dependency goes away and one when it is back, not per retry;
    and again, during the outage, when its error is another than the one told (at most
    every RETELL_AFTER_S): an outage that began as one error and went on as another was
    told by its first alone (a review: `client|setname` refused on one node, then an
    UNLINK of a key the ACL refuses, which never showed)."""

    def __init__(self, name: str, metrics: Metrics) -> None:
        self.name = name
        self.available: bool | None = None
        self._down_since = 0.0
        self._told = ""  # the error told last
        self._told_at = 0.0
        self.failures = 0
        self._errors = metrics.errors.labels(name)
        self._reconnects = metrics.reconnects.labels(name)
        self._up = metrics.up.labels(name)

    def up(self) -> None:
        if self.available is False:
            log.info(f"{self.name}_available", down_s=round(time.monotonic() - self._down_since, 3))
            self._reconnects.inc()
        if self.available is not True:
            self._up.set(1)
        self.available = True

    def down(self, exc: BaseException) -> None:
        self.failures += 1
        self._errors.inc()
        error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self.available is not False:
            self._down_since = now
            log.warning(f"{self.name}_unavailable", error=error, **_advice(exc))
            self._up.set(0)
        elif error != self._told and now - self._told_at >= RETELL_AFTER_S:
            log.warning(
                f"{self.name}_unavailable",
                error=error,
                down_s=round(now - self._down_since, 3),
                **_advice(exc),
            )
        else:
            self.available = False
            return
        self._told, self._told_at = error, now
        self.available = False


def _advice(exc: BaseException) -> dict[str, str]:
    """What to do about an outage that is a refusal: Redis's NOPERM names the command or
    says "one of the keys", not which key or template (`check` does)."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return {
            "detail": "the Redis user's ACL refuses a command or a key the listener needs: "
            "`cdc-invalidator check` names the template; every change waits until the ACL "
            "allows it (docs/redis.md)"
        }
    return {}


@dataclass(frozen=True, slots=True)
class Health:
    alive: bool  # the loop turns
    ready: bool  # both stores answer, and not behind by more than allowed
    detail: dict[str, object]


class Runner:
    def __init__(  # noqa: PLR0913 - every part is keyword-only
        self,
        *,
        connect: Callable[[], Source],
        mapper: Mapper,
        sink: Sink,
        config: RunnerConfig,
        stopper: Stopper,
        watch: RedisWatch | None = None,
        metrics: Metrics | None = None,
        tap: Tap | None = None,
        sweep_sink: SweepSink | None = None,
        mapping_changed: Callable[[], bool] | None = None,
    ) -> None:
        self._connect = connect
        # Whether the configuration file now holds other tables (settings.ConfigFile),
        # asked before each batch acknowledges, before a replay renders, and when a batch
        # meets a table or a column the mapping lacks: `install` of a new mapping
        # compiles capture functions that queue what only it renders before this
        # listener is restarted with it. None: never asked.
        self._mapping_changed = mapping_changed
        self._mapper = mapper
        self._sink = sink
        self._config = config
        self._stopper = stopper
        self._watch = watch
        self._tap = tap
        # Second deletes (second_delete_ms), due after each batch's first.
        self._later = SecondDeletes(sink, config.second_delete_s, self._deleted_again)
        # A Pipelined batch's deletes were sent, their confirmation left to the next.
        self._deletes_owed = False
        self.metrics = metrics or Metrics()
        # Sweeps behind the loop, on a thread with a Redis connection of its own (a sink
        # of its own: `sweep_sink`, closed with it; without one, through `sink`, which
        # must then be safe to share with a thread).
        self._sweeper = Sweeper(
            sweep=sweep_sink.sweep_routed
            if sweep_sink is not None
            else lambda works, _stopped: sink.delete_routed(works),
            metrics=self.metrics,
            second_delete_s=config.second_delete_s,
            retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s,
            close=sweep_sink.close if sweep_sink is not None else None,
        )
        self.postgres = Availability("postgres", self.metrics)
        self.redis = Availability("redis", self.metrics)
        # For /healthz and /readyz: when the loop last turned (time.monotonic()), whether
        # this listener consumes, and how far behind the last transaction it finished was.
        self.turned_at = time.monotonic()
        self.active = False
        # What holds the source that is no listener of ours (Standby.foreign): not ready.
        self.held_by: str | None = None
        self.behind_s = 0.0
        # When the oldest transaction of the batch in hand was recorded (time.monotonic()),
        # until it is acknowledged or given up: a batch held up (Redis holding its deletes)
        # makes the listener fall behind before anything is finished.
        self.in_hand_since: float | None = None
        self.events_processed = 0
        self._keys_deleted = 0  # by the loop; the sweeper counts its own
        self.keys_deleted_again = 0  # by second deletes: stale sets they undid
        self.dead_letters = 0
        # Each table's unrenderable changes: the reasons logged in the last minute, when
        # (time.monotonic()), and the sweeps not logged since its last line.
        self._unrenderable_told: dict[TableName, _Told] = {}
        # The dead letters' errors logged lately (a line each once a minute).
        self._dead_told = _Told(DEAD_LETTER_LOG_EVERY_S, DEAD_LETTER_ERRORS_TOLD)

    def run(self) -> None:
        """Until stop(): a batch in hand is finished (or rolled back) before returning."""
        try:
            self._run()
        finally:
            # A sweep in hand is given up: its batch was never acknowledged (the source
            # saved the position before it) and comes again.
            self._sweeper.stop()

    def _run(self) -> None:
        cfg = self._config
        backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        log.info("listener_started", tables=sorted(str(t) for t in self._mapper.tables))
        standby = False
        while not self._stopper.stopped:
            self.turned_at = time.monotonic()
            try:
                source = self._connect()
            except Fatal:
                raise
            except Standby as exc:
                # Another listener is active: a hot standby, polling for its turn.
                self.postgres.up()  # it answered
                if not standby:
                    log.info("standby", reason=str(exc))
                    standby = True
                    self._set_active(False)
                self._held_by_foreign(exc)
                self._ping_redis()
                self._refuse_changed_file()  # (a standby takes over with the file's)
                self._stopper.sleep(cfg.poll_interval_s)
                continue
            except psycopg.OperationalError as exc:
                self.postgres.down(exc)
                # The file may name another server now (the database moved): retrying
                # the one that is gone would never end.
                self._refuse_changed_file()
                self._stopper.sleep(backoff.next_delay())
                continue
            self.postgres.up()
            self._held_by_foreign(None)
            connected_at = time.monotonic()
            if standby:
                log.info("active")
                standby = False
            self._set_active(True)
            lost: psycopg.OperationalError | None = None
            try:
                self._consume(source)
            except psycopg.OperationalError as exc:
                lost = exc
            finally:
                # Before any back-off: a source whose other session still works (logical
                # mode's stream beside a lost bookkeeping session) must not hold the slot,
                # or the queue's lock, from a standby while this one waits.
                self._set_active(False)
                source.close()
            if lost is not None:
                # The connection is dead (server restart, terminated backend): a batch in
                # hand was not acknowledged and comes again; reconnect and go on. The
                # back-off starts over only after a connection that lasted: one that
                # fails again at once (an error every turn meets, not the network) is
                # retried later and later, not ten times a second.
                self.postgres.down(lost)
                if time.monotonic() - connected_at >= HEALTHY_CONNECTION_S:
                    backoff.reset()
                self._stopper.sleep(backoff.next_delay())
        self._finish()

    def _finish(self) -> None:
        """On the way out: the Pipelined deletes' replies read (nothing acknowledged
        waits for them: read so that they count as deletes), then the second deletes
        owed, both given up at once if Redis fails."""
        log.info("stopping", second_deletes_owed=self._later.next_due is not None)
        failed: BaseException | None = None
        try:
            self._confirm_owed()
        except REDIS_UNAVAILABLE as exc:
            failed = exc
        self._later.finish(failed)
        if self._tap is not None:
            self._tap.close()
        log.info("listener_stopped", **self._counters())

    @property
    def keys_deleted(self) -> int:
        """Keys deleted that existed, by the loop and its sweeps."""
        return self._keys_deleted + self._sweeper.keys_swept

    @property
    def sweeper(self) -> Sweeper:
        return self._sweeper

    def _counters(self) -> dict[str, int]:
        return {
            "events": self.events_processed,
            "keys_deleted": self.keys_deleted,
            "keys_deleted_again": self.keys_deleted_again + self._sweeper.keys_swept_again,
            "keys_swept": self._sweeper.keys_swept,
            "sweeps": self._sweeper.completed,
            "dead_letters": self.dead_letters,
        }

    def _consume(self, source: Source) -> None:
        cfg = self._config
        backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        redis_back = True  # ask Redis who it is before the first batch, and after outages
        # Redis answers INFO but refused our last deletes (READONLY, NOREPLICAS, MISCONF):
        # only a batch that goes through makes it available again.
        writes_refused = False
        full = False  # the last batch took batch_size events: a backlog is draining
        while not self._stopper.stopped:
            started = self.turned_at = time.monotonic()
            deleting = False
            try:
                if redis_back:  # (before anything is deleted: who is it now?)
                    self._look_at_redis(source, force=True, refused=writes_refused)
                redis_back = False
                deleting = True
                # While a backlog drains, second deletes wait up to second_delete_s past
                # their time: every key of the backlog is stale until its first delete,
                # a second delete only undoes a stale SET that may have come. (A 100k
                # drain's first 17 batches owed 170,000 second deletes at 300 ms, which
                # held its last batch back 110-140 ms.) They are not skipped: done once
                # the batches are no longer full, or second_delete_s late at most.
                until = started - cfg.second_delete_s if full else started
                if (due := self._later.next_due) is not None and due <= until:
                    self._confirm_owed()  # (second deletes' replies must be theirs alone)
                self._later.run(until=until)
                taken = self._process_batch(source)
                # The periodic look at Redis's identity (redis_check_interval_ms) comes
                # after a batch's deletes, not before them: a round trip (an INFO) that
                # the change that woke the listener would wait for (4 of the 15 slowest
                # of 921 changes waited for it, 0.5-1.0 ms each: docs/benchmarks.md).
                deleting = False
                self._look_at_redis(source, force=False, refused=writes_refused and not taken)
            except REDIS_UNAVAILABLE as exc:
                self.redis.down(exc)
                redis_back = True
                writes_refused = deleting
                # Between batches only, the file was never looked at while Redis stayed
                # down: a listener whose file names another Redis now (the old one
                # retired) retried the old one for good (a review). Nothing of the
                # failed batch was acknowledged.
                self._refuse_changed_file()
                source.maintain()  # due during an outage too (the stream's status updates)
                self._stopper.sleep(backoff.next_delay())
                continue
            full = taken >= cfg.batch_size
            if taken:
                writes_refused = False
                self.redis.up()
                backoff.reset()
            source.maintain()
            if 1 < taken < cfg.batch_size:
                # Under load (changes arrive faster than one batch each): let the next
                # batch gather for a while since this one started, instead of waking for
                # every commit. Batches grow and the cost per event falls; one change at
                # a time (the quiet case) is never delayed.
                self._stopper.sleep(started + linger_for(taken, cfg.linger_s) - time.monotonic())
            elif taken < cfg.batch_size:
                timeout = cfg.poll_interval_s
                if (due := self._later.next_due) is not None:
                    timeout = min(timeout, due - time.monotonic())
                source.wait(max(0.0, timeout), self._stopper.fileno())
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_EVERY_S
                log.info("progress", **self._counters())

    def _look_at_redis(self, source: Source, *, force: bool, refused: bool) -> None:
        """Ask Redis who it is, when a check is due or `force`d (RedisWatch.check), and
        replay if it is another; Redis is available once it answers, unless it `refused`
        the last deletes (READONLY, ...), which only a batch that goes through undoes."""
        if self._watch is None:
            return
        if replayed := self._watch.check(
            force=force,
            settle=source.settle,
            sweep_later=self._sweeper.again,
            before_rendering=self._refuse_changed_file,
        ):
            self.metrics.replays.inc()
            self.metrics.replayed_keys.inc(replayed.existed)
        if not refused:
            self.redis.up()  # it answered (or did, less than a check ago)

    def _process_batch(self, source: Source) -> int:
        try:
            return self._process_batch_in_hand(source)
        finally:
            self.in_hand_since = None  # acknowledged (and observed), or given up

    def _process_batch_in_hand(self, source: Source) -> int:
        with source.batch(self._config.batch_size) as batch:
            later = confirm_later_of(batch)
            if not later:
                # Deletes of the shares before, which Redis may not have confirmed yet:
                # confirmed before this batch acknowledges, whatever it holds.
                self._confirm_owed()
            if not batch.size:
                self._refuse_changed_file()  # (an idle listener stops for the file too)
                if not batch.ages_s:
                    self.behind_s = 0.0  # caught up
                else:
                    # Changes the source holds back (logical mode: commits a synchronous
                    # standby has not let become visible yet), or a commit whose changes
                    # came before: behind by the oldest (a review: /readyz said 0 s
                    # behind for as long as a standby held everything back).
                    self.behind_s = max(batch.ages_s) + (time.monotonic() - batch.read_at)
                return 0
            if (oldest_s := batch.oldest_s) is not None:
                self.in_hand_since = batch.read_at - oldest_s
            if early := early_of(batch):
                # Acknowledges nothing: the queue read that follows looks at the file.
                self._delete_early(batch, early)
                return batch.size
            works, failed = self._map(batch)
            self._refuse_stale_mapping(failed, works)
            for event, exc in failed:
                batch.dead_letter(event.position, str(exc))
            keys, sweeps = split_sweeps(works)
            self._deletes_owed = later
            deleted = self._sink.delete_routed(keys, later=later)
            # Looked at once the deletes are out, before the batch acknowledges (the
            # with's exit), not before its read: a commit's wake-up no longer waits for
            # a stat() (profiled: 15 us of the 135 us from a NOTIFY to its UNLINK sent).
            # Deletes of a mapping the file no longer holds are extra ones; its changes
            # come again to the listener that starts with the file.
            self._refuse_changed_file()
            # The sweep goes behind the loop; the batch is acknowledged once it is done.
            hold = batch.hold() if sweeps else None
        if hold is not None:
            since = self.in_hand_since or batch.read_at  # (a resync batch has no commits)
            self._sweeper.add(sweeps, hold, since, batch.visible_at)
        self._later.add(keys, batch.visible_at)
        if self._tap is not None:
            self._tap.after(batch)
        # Committed: Redis had confirmed every delete before the acknowledgement.
        self._tell_dead_letters(batch.dead)
        for work in works.values():
            for (table, kind), seen in work.stood_in.items():
                self._swept_for(table, kind, seen)
        self._observe(batch, deleted)
        log.debug(
            "batch_processed",
            events=batch.size,
            keys=sum(len(w.keys) for w in works.values()),
            patterns=sum(len(w.patterns) for w in works.values()),
            existed=deleted,
        )
        return batch.size

    def _tell_dead_letters(self, dead: dict[int, str]) -> None:
        """Log a batch's dead letters: each error once a minute, at most
        DEAD_LETTER_ERRORS_TOLD errors a minute (every one is kept, and counted)."""
        for position, error in dead.items():
            if (held := self._dead_told.tell(error)) is None:
                continue
            log.warning(
                "event_dead_lettered",
                position=position,
                error=error,
                # Dead letters since the last line that were not logged (each is in
                # dead_letter_v1, counted in _dead_letters_total).
                dead_letters_not_logged=held,
                detail="its keys were not deleted: the event is kept in "
                "cdc_invalidator.dead_letter_v1 with this error; fix the cause and requeue "
                "it (docs/operations.md, Dead letters)",
            )

    def _refuse_changed_file(self) -> None:
        """Raise ConfigurationChanged, before a batch acknowledges and before a replay
        renders, once the configuration file holds other tables (a stat() each time; read
        only when that changed). `install` of them makes the capture queue what only they
        render: a table added, a template's column, and a template added on a column
        already copied, whose keys no change of this mapping would ever fail to map and so
        reveal (the documented order edits the file first)."""
        if self._mapping_changed is not None and self._mapping_changed():
            raise ConfigurationChanged(
                "the configuration file's tables changed since the listener started (or its "
                "capture mode, or another setting)"
            )

    def _refuse_stale_mapping(
        self, failed: list[tuple[ChangeEvent, InvalidEvent]], works: Routed
    ) -> None:
        """Raise ConfigurationChanged, before anything of the batch is done, when it
        holds a change the mapping cannot render and the configuration file has another
        mapping now: that change would be a dead letter, or a sweep of the templates the
        file no longer has, while the new ones' keys stayed cached."""
        if self._mapping_changed is None:
            return
        culprit = stale_mapping(failed, works)
        if culprit is not None and self._mapping_changed():
            raise ConfigurationChanged(culprit)

    def _confirm_owed(self) -> None:
        """Wait for Redis to confirm the deletes of Pipelined batches before (counted as
        keys deleted, as theirs)."""
        if not self._deletes_owed:
            return
        existed = self._sink.delete_routed({})
        self._deletes_owed = False
        self._keys_deleted += existed
        self.metrics.keys_deleted.inc(existed)

    def _map(self, batch: Batch) -> tuple[Routed, list[tuple[ChangeEvent, InvalidEvent]]]:
        """The batch's keys and patterns, with what its source rendered already; the
        events that could not be mapped."""
        premapped = premapped_of(batch)
        if premapped and not batch.events:
            return premapped, []  # (its own: a share's 10,000 keys are not copied)
        works, failed = self._mapper.map_all(batch.events)
        if premapped:
            merge(works, premapped)
        return works, failed

    def _delete_early(self, batch: Batch, early: Early) -> None:
        """An Early batch's keys, deleted (and due again as second deletes); counted only
        in keys deleted. Sweeps, and the log of an unrenderable change, are left to the
        batch that acknowledges, held as it must be."""
        works, failed = self._mapper.map_all(batch.events)
        keys, sweeps = split_sweeps(works)
        if sweeps:  # (a TRUNCATE standing in for anything sweeps too: mapper.add)
            early.leave()
            return
        for event, exc in failed:
            batch.dead_letter(event.position, str(exc))
        deleted = self._sink.delete_routed(keys)
        self._later.add(keys, batch.visible_at)
        if self._tap is not None:
            self._tap.after(batch)
        self._keys_deleted += deleted
        self.metrics.keys_deleted.inc(deleted)
        if batch.oldest_s is not None:
            # Done: as far behind as its oldest change (the batch that acknowledges it
            # says about the same, by the server's clock), until a batch finds nothing.
            self.behind_s = batch.oldest_s + (time.monotonic() - batch.read_at)

    def _swept_for(self, table: TableName, kind: StandInKind, seen: StoodIn) -> None:
        """Count and log a batch's sweep of `table` standing for `seen` (events.stand_in).

        Unrenderable changes: a sweep counted per batch, logged once a minute per table
        and reason, a reason not told in the last minute at once, at most
        UNRENDERABLE_REASONS_TOLD reasons a minute per table (until install runs again,
        every batch with such a change sweeps). Bulk statements: each counted, logged per
        batch (each one is an event worth seeing).
        The sweep after missed changes: nothing here, the capture logs it when done."""
        if kind is StandInKind.BULK:
            self.metrics.bulk_sweeps.labels(str(table)).inc(seen.times)
            log.info("bulk_statements_swept", table=str(table), statements=seen.times)
            return
        if kind is StandInKind.RESYNC:
            # Logged by the capture: as it owes it (changes_may_have_been_missed), and in
            # logical mode once done (missed_changes_swept); trigger mode queued it.
            return
        if kind is not StandInKind.UNRENDERABLE:
            assert_never(kind)
        self.metrics.unrenderable_sweeps.labels(str(table)).inc()
        # Each reason once a minute per table: a reason not told in the last minute is
        # news, told at once (a rewrite's sweep, which needs nothing, hid for a minute the
        # retype's, which needs install). Not only the last reason remembered: a table's
        # INSERTs and UPDATEs give two reasons (the new row's, the old row's), and batches
        # alternating them logged a line each.
        told = self._unrenderable_told.get(table)
        if told is None:
            told = self._unrenderable_told[table] = _Told(
                UNRENDERABLE_LOG_EVERY_S, UNRENDERABLE_REASONS_TOLD
            )
        unlogged = told.tell(seen.detail)
        if unlogged is None:
            return
        log.warning(
            "unrenderable_changes_swept",
            table=str(table),
            reason=seen.detail,
            # Batches of this table swept since its last line and not logged.
            sweeps_not_logged=unlogged,
            action="swept the key templates of the table its changes could not render "
            "(all of them for a table that lost key columns in logical mode); if its "
            "columns changed, edit the configuration to the new schema and run "
            "`cdc-invalidator install`; a value that is not UTF-8 (a SQL_ASCII "
            "database) needs nothing",
        )

    def _deleted_again(self, existed: int) -> None:
        self.keys_deleted_again += existed
        self.metrics.keys_deleted_again.inc(existed)

    def _observe(self, batch: Batch, deleted: int) -> None:
        """Count an acknowledged batch: the counters logged at exit, and the metrics."""
        self.events_processed += batch.size
        self._keys_deleted += deleted
        self.dead_letters += len(batch.dead)
        m = self.metrics
        m.batches.inc()
        m.events.inc(batch.size)
        m.keys_deleted.inc(deleted)
        if batch.dead:
            m.dead_letters.inc(len(batch.dead))
        if batch.ages_s:
            since_read = time.monotonic() - batch.read_at
            m.observe_lags([age + since_read for age in batch.ages_s])
            # The newest transaction done: how far behind the listener is now.
            self.behind_s = min(batch.ages_s) + since_read

    def _ping_redis(self) -> None:
        """A standby deletes nothing, but says whether Redis answers: its `up` gauge and
        /readyz's `redis` said 0 for as long as it waited, Redis being fine (a dashboard's
        "stores up" showed Redis down while any standby ran)."""
        try:
            self._sink.ping()
        except REDIS_UNAVAILABLE as exc:
            self.redis.down(exc)
        else:
            self.redis.up()

    def _held_by_foreign(self, standby: Standby | None) -> None:
        """What holds the source when it is no listener of ours (Standby.foreign): said
        once for each holder, and /readyz is not ready while it lasts. A standby waits
        for a listener to end; this may never end by itself."""
        foreign = standby.foreign if standby is not None else None
        if standby is not None and foreign is not None and foreign != self.held_by:
            log.warning(standby.event, holder=foreign, detail=str(standby))
        self.held_by = foreign

    def _set_active(self, active: bool) -> None:
        self.active = active
        self.metrics.active.set(1 if active else 0)

    def health(self, stall_s: float, max_lag_s: float) -> Health:
        """/healthz: the loop turned within stall_s. /readyz: besides, PostgreSQL answers,
        and an active listener has Redis and is at most max_lag_s behind: behind the
        newest transaction it finished, the oldest of the batch in hand, or its loop's
        last turn (a statement stuck on a lock holds everything after it), whichever is
        further. (A standby is ready: it is what takes over.)"""
        loop_age = time.monotonic() - self.turned_at
        alive = loop_age <= stall_s
        postgres, redis_ok = bool(self.postgres.available), bool(self.redis.available)
        ready = alive and postgres
        # (An active loop turns at least every poll interval while all is well: what it
        # is late past that, it is behind.)
        stuck_s = loop_age - self._config.poll_interval_s if self.active else 0.0
        behind_s = max(self.behind_s, stuck_s)
        if (since := self.in_hand_since) is not None:
            behind_s = max(behind_s, time.monotonic() - since)
        if (since := self._sweeper.oldest_since) is not None:
            behind_s = max(behind_s, time.monotonic() - since)  # a sweep not done
        if self.active:
            ready = ready and redis_ok and behind_s <= max_lag_s
        ready = ready and self.held_by is None
        return Health(
            alive,
            ready,
            {
                "role": "active" if self.active else "standby",
                **({"held_by": self.held_by} if self.held_by is not None else {}),
                "loop_age_s": round(loop_age, 3),
                "postgres": postgres,
                "redis": redis_ok,
                "behind_s": round(behind_s, 3),
                "sweeps_pending": self._sweeper.pending,
                "max_lag_s": max_lag_s,
            },
        )
