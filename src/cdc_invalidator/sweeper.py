"""Sweeps behind the loop: a batch's patterns (TRUNCATE, changes that cannot be
rendered, the sweep after a lost slot) swept on a thread of their own, so that changes
committed during a sweep have their keys deleted as fast as if none were running.

A sweep is a full SCAN of Redis: seconds for a few million keys. The runner deletes the
batch's keys, takes a hold on the batch (capture/holds.py: the source reads on, but
acknowledges nothing from that batch on), and hands the patterns here. Sweeps run one
at a time, in the order they were handed over, so their holds are released in order;
those that wait behind a sweep in progress are swept together in the next pass (a run
of TRUNCATEs costs one pass more, not one each).
A sweep that fails (Redis down) is tried again with back-off, its hold kept; on
shutdown the sweep in hand is given up between two SCAN pages and its batch, never
acknowledged, comes again.

With second_delete_ms, a sweep that started before its batch's changes were visible
for that long is done once more at that time, as the second delete of its keys (not
holding anything). Such second sweeps wait on their own: a first sweep handed over
meanwhile goes first, never held back until a second sweep falls due. So do the sweeps
handed over by again(), holding nothing either (a replay's, the second deletes a
predecessor owed): their Ticket says when they are done.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from cdc_invalidator.backoff import Backoff
from cdc_invalidator.capture.holds import Hold
from cdc_invalidator.mapping import Routed, merge
from cdc_invalidator.metrics import Metrics
from cdc_invalidator.sink import SweepStopped

log = structlog.get_logger("cdc_invalidator.sweeper")

# sweep(works, stopped) -> how many keys existed; `stopped` is asked between SCAN pages.
SweepFn = Callable[[Routed, Callable[[], bool]], int]
# A sweep holding nothing handed over (Sweeper.again): what the caller learns of it.
SweepLater = Callable[[Routed], "Ticket"]


@dataclass(slots=True)
class Ticket:
    """What the caller of Sweeper.again() learns of its sweep, from the sweeper's thread:
    `done` is set once it is, with `existed`, the keys of the pass it was swept in."""

    done: threading.Event = field(default_factory=threading.Event)
    existed: int = 0
    # The last failed try's error, while it is tried again (or one ahead of it is).
    error: str | None = None


@dataclass(slots=True)
class SweepJob:
    works: Routed  # patterns only
    holds: list[Hold]  # released once done; none: a second sweep, holding nothing
    since: float | None  # when its oldest change was recorded (time.monotonic())
    visible_at: float | None  # when its changes were visible (runner.Batch)
    due: float = 0.0  # not before (time.monotonic()): a second sweep's time
    tickets: list[Ticket] = field(default_factory=list)  # again()'s, told when done

    @property
    def patterns(self) -> int:
        return sum(len(work.patterns) for work in self.works.values())

    def absorb(self, later: SweepJob) -> None:
        """Sweep `later`'s patterns in this pass too, and release its holds (and tell its
        tickets) with ours.
        Its second sweep is due with ours, at the later of the two times (as safe)."""
        merge(self.works, later.works)
        self.holds += later.holds
        self.tickets += later.tickets
        if self.since is None or (later.since is not None and later.since < self.since):
            self.since = later.since
        if self.visible_at is not None:
            # (the later: taking `later`'s, which may be the earlier when its
            # transaction was seen visible first, made the second sweep early)
            self.visible_at = (
                None if later.visible_at is None else max(self.visible_at, later.visible_at)
            )


class Sweeper:
    def __init__(  # noqa: PLR0913 - every part is keyword-only
        self,
        *,
        sweep: SweepFn,
        metrics: Metrics,
        second_delete_s: float = 0.0,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 1.0,
        close: Callable[[], None] | None = None,
    ) -> None:
        self._sweep = sweep
        self._metrics = metrics
        self._second_delete_s = second_delete_s
        self._retry = (retry_initial_s, retry_max_s)
        self._close = close
        self._jobs: deque[SweepJob] = deque()  # first sweeps, holding their batches
        self._seconds: list[SweepJob] = []  # second sweeps, holding nothing, by `due`
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Written by the sweeper's thread only: keys its first sweeps found, its second.
        self.keys_swept = 0
        self.keys_swept_again = 0
        self.completed = 0
        self.failures = 0  # failed tries

    def add(self, works: Routed, hold: Hold, since: float | None, visible_at: float | None) -> None:
        """A batch's sweep, its batch handed back with `hold` taken."""
        with self._lock:
            self._jobs.append(SweepJob(works, [hold], since, visible_at))
            self._metrics.sweeps_pending.set(self._held())
            self._lock.notify()
        self._start()

    def again(self, works: Routed) -> Ticket:
        """A sweep holding nothing, due now: a replay's (redis_guard/watch.py), the second
        deletes a predecessor owed (second_deletes.redo_owed). It waits behind first
        sweeps, as second sweeps do, and is tried again until done, or the stop."""
        ticket = Ticket()
        with self._lock:
            job = SweepJob(works, [], None, None, time.monotonic(), [ticket])
            bisect.insort(self._seconds, job, key=lambda j: j.due)
            self._lock.notify()
        self._start()
        return ticket

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cdc-sweeper", daemon=True)
            self._thread.start()

    @property
    def pending(self) -> int:
        """Sweeps whose batches are not acknowledged yet."""
        with self._lock:
            return self._held()

    @property
    def oldest_since(self) -> float | None:
        """When the oldest change of a batch whose sweep is not done was recorded
        (time.monotonic()): the listener is behind from then (for /readyz)."""
        with self._lock:
            return min((j.since for j in self._jobs if j.holds and j.since), default=None)

    def stop(self) -> None:
        """Give up the sweep in hand (its batch is not acknowledged and comes again) and
        the rest; wait for the thread."""
        self._stopping.set()
        with self._lock:
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._close is not None:
            self._close()

    def _held(self) -> int:
        return sum(len(job.holds) for job in self._jobs)

    def _next(self) -> SweepJob | None:
        """The first sweep handed over (with those that came after it, swept together),
        else the second sweeps due by now (together); None once stopping."""
        with self._lock:
            jobs, seconds = self._jobs, self._seconds
            while not self._stopping.is_set():
                if jobs:
                    job = jobs[0]
                    while len(jobs) > 1:
                        job.absorb(jobs[1])  # batches that came during the last sweep
                        del jobs[1]
                    return job
                now = time.monotonic()
                if seconds and seconds[0].due <= now:
                    job = seconds[0]
                    while len(seconds) > 1 and seconds[1].due <= now:
                        job.absorb(seconds.pop(1))
                    return job
                # Woken by add() or stop(), or when the next second sweep falls due.
                self._lock.wait(seconds[0].due - now if seconds else None)
            return None

    def _run(self) -> None:
        backoff = Backoff(*self._retry)
        failing = False
        while (job := self._next()) is not None:
            started = time.monotonic()
            try:
                existed = self._sweep(job.works, self._stopping.is_set)
            except SweepStopped:
                log.info("sweep_given_up", patterns=job.patterns, reason="stopping")
                return
            except Exception as exc:
                # Redis down (or anything else): the batch stays unacknowledged and the
                # sweep is tried again; the loop's own deletes go on meanwhile.
                self.failures += 1
                error = f"{type(exc).__name__}: {exc}"
                self._tell_waiting(error, job)
                if not failing:
                    log.warning("sweep_failed", error=error)
                    failing = True
                self._metrics.errors.labels("redis").inc()
                self._stopping.wait(backoff.next_delay())
                continue
            failing = False
            backoff.reset()
            self._done(job, existed, started)

    def _tell_waiting(self, error: str, job: SweepJob) -> None:
        """A failed try's error, to the tickets of `job` and of every sweep waiting
        behind it: theirs are not tried while it fails."""
        with self._lock:
            for waiting in (job, *self._jobs, *self._seconds):
                for ticket in waiting.tickets:
                    ticket.error = error

    def _done(self, job: SweepJob, existed: int, started: float) -> None:
        m = self._metrics
        m.sweeps.inc()
        m.keys_swept.inc(existed)
        if job.holds:
            self.keys_swept += existed
            m.keys_deleted.inc(existed)
        else:  # a second sweep: stale SETs it undid
            self.keys_swept_again += existed
            m.keys_deleted_again.inc(existed)
        self.completed += 1
        with self._lock:
            if job.holds:
                self._jobs.popleft()
                for hold in job.holds:
                    hold.release()
                if self._second_delete_s:
                    due = (job.visible_at or started) + self._second_delete_s
                    if started < due:  # a stale SET may have landed behind the sweep
                        second = SweepJob(job.works, [], None, None, due)
                        bisect.insort(self._seconds, second, key=lambda j: j.due)
                m.sweeps_pending.set(self._held())
            else:  # by identity: another second sweep may hold equal patterns
                self._seconds = [second for second in self._seconds if second is not job]
            for ticket in job.tickets:
                ticket.existed = existed
                ticket.done.set()
        log.info(
            "sweep_completed",
            patterns=job.patterns,
            existed=existed,
            seconds=round(time.monotonic() - started, 3),
            batches=len(job.holds),
            second=not job.holds,
        )
