"""Prometheus metrics of one listener, in a registry of its own (no global state).

The runner counts as it goes; what only the database knows (the trigger queue's
backlog, the slot's lag) is read when Prometheus scrapes, on a connection of the
collector's own, at most once per FIGURES_MAX_AGE_S however many scrape.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cdc_invalidator.status import NotInstalledHere

log = structlog.get_logger("cdc_invalidator.metrics")

PREFIX = "cdc_invalidator"
# Commit-to-delete lag buckets: from the sub-millisecond quiet case to a backlog.
LAG_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(f"{PREFIX}_events", "Row changes processed", registry=r)
        self.keys_deleted = Counter(
            f"{PREFIX}_keys_deleted", "Keys deleted that existed (UNLINK's count)", registry=r
        )
        self.keys_deleted_again = Counter(
            f"{PREFIX}_keys_deleted_again",
            "Keys deleted again by second_delete_ms that existed: late stale SETs undone",
            registry=r,
        )
        self.unrenderable_sweeps = Counter(
            f"{PREFIX}_unrenderable_sweeps",
            "Sweeps of a table's templates standing for changes that could not be rendered "
            "(a key column dropped, a partition without triggers): run install",
            ["table"],
            registry=r,
        )
        self.bulk_sweeps = Counter(
            f"{PREFIX}_bulk_sweeps",
            "Statements of at least bulk_sweep_rows rows whose table is swept instead of "
            "their rows' keys deleted (trigger mode; counted as their sweep is handed over)",
            ["table"],
            registry=r,
        )
        self.sweeps = Counter(
            f"{PREFIX}_sweeps",
            "Sweeps completed (a batch's patterns: TRUNCATE, bulk statements, unrenderable "
            "changes, missed changes; one SCAN pass each), second sweeps included",
            registry=r,
        )
        self.sweeps_pending = Gauge(
            f"{PREFIX}_sweeps_pending",
            "Sweeps handed to the sweeper and not done: their batches are not acknowledged",
            registry=r,
        )
        self.keys_swept = Counter(
            f"{PREFIX}_keys_swept",
            "Keys sweeps deleted that existed (also counted in keys_deleted, or "
            "keys_deleted_again for a second sweep)",
            registry=r,
        )
        self.batches = Counter(f"{PREFIX}_batches", "Batches acknowledged", registry=r)
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters", "Events parked as dead letters", registry=r
        )
        self.lag = Histogram(
            f"{PREFIX}_commit_to_delete_seconds",
            "From a transaction's commit (trigger mode: its start) to Redis confirming its "
            "deletes, per transaction",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.errors = Counter(f"{PREFIX}_errors", "Failed tries, by store", ["store"], registry=r)
        self.reconnects = Counter(
            f"{PREFIX}_reconnects", "Times a store came back after failing", ["store"], registry=r
        )
        self.up = Gauge(f"{PREFIX}_up", "1 if the store answers, by store", ["store"], registry=r)
        self.active = Gauge(
            f"{PREFIX}_active", "1 while this listener consumes, 0 as a standby", registry=r
        )
        self.replays = Counter(
            f"{PREFIX}_replays", "Replays after Redis came back as another server", registry=r
        )
        self.replayed_keys = Counter(
            f"{PREFIX}_replayed_keys", "Keys a replay found back in Redis and deleted", registry=r
        )
        for store in ("postgres", "redis"):
            self.errors.labels(store)
            self.reconnects.labels(store)
            self.up.labels(store).set(0)

    def observe_lags(self, lags_s: Sequence[float]) -> None:
        """lag.observe() for each value: a batch's transactions, one lock taken per bucket
        touched instead of a bucket walk and two locks per value (a busy database gives
        a dozen transactions a batch, every few milliseconds)."""
        lag = self.lag
        # prometheus_client observes one value at a time; these are the fields its
        # observe() updates (tests/test_metrics.py checks the result against it).
        bounds: list[float] = lag._upper_bounds
        for i, n in Tally(bisect_left(bounds, value) for value in lags_s).items():
            lag._buckets[i].inc(n)
        lag._sum.inc(sum(lags_s))

    def watch_database(self, collector: Collector) -> None:
        self.registry.register(collector)


# A scrape within this of the last reading gets its figures again: several Prometheus
# servers, or a person with curl, cost the database one round of queries per interval.
FIGURES_MAX_AGE_S = 1.0
# How long a scrape waits for the reading before it answers without figures (status_up
# 0): scrapes never pile up behind a reading that hangs, nor wait on it themselves (a
# server that does not answer at all: a backend stopped, a pooler out of connections).
READING_WAIT_S = 5.0

# (name without the prefix, help, value)
Figures = list[tuple[str, str, float]]


class DatabaseFigures(Protocol):
    """What a capture mode (modes/) reads from the database at scrape time."""

    def figures(self, conn: psycopg.Connection[Any]) -> Figures: ...


class BacklogCollector(Collector):
    """Backlog (trigger mode) or slot lag (logical mode), read at scrape time.

    Scrapes come from the probe server's threads. The queries run in a thread of their
    own, one round at a time, which alone uses the connection; a scrape waits for it
    READING_WAIT_S at most. A lock guards the cached figures and that thread's handle.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        mode: DatabaseFigures,
        *,
        max_age_s: float = FIGURES_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._mode = mode
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        # Under the lock: the last reading (None: it failed), when it was taken, and the
        # thread taking the next one (None: none running).
        self._figures: Figures | None = None
        self._read_at: float | None = None
        self._reading: threading.Thread | None = None
        # The reading thread's own: its connection, and whether the figures could be read
        # last time (for one log line per change).
        self._conn: psycopg.Connection[Any] | None = None
        self._readable: bool | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # not known before the first scrape: no description at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = self._current()
        up = GaugeMetricFamily(
            f"{PREFIX}_status_up", "1 if the backlog or slot figures below could be read"
        )
        up.add_metric([], 0 if figures is None else 1)
        yield up
        for name, help_, value in figures or []:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_)
            family.add_metric([], value)
            yield family

    def _current(self) -> Figures | None:
        # A reading counts from when it started: one still running from before (its
        # scrape gave up on it) is waited for, then, stale, followed by a fresh one.
        deadline = time.monotonic() + READING_WAIT_S
        asked = self._clock()
        while True:
            with self._lock:
                read_at = self._read_at
                # (one started since this scrape asked will do, however long it took)
                if read_at is not None and (
                    read_at >= asked or self._clock() - read_at < self._max_age_s
                ):
                    return self._figures
                if self._reading is None:
                    self._reading = threading.Thread(
                        target=self._refresh, name="cdc-invalidator-metrics-reading", daemon=True
                    )
                    self._reading.start()
                reading = self._reading
            reading.join(max(0.0, deadline - time.monotonic()))
            if reading.is_alive():
                return None

    def _refresh(self) -> None:
        started = self._clock()
        figures = self._read_logged()
        with self._lock:
            self._figures, self._read_at, self._reading = figures, started, None

    def _read_logged(self) -> Figures | None:
        try:
            figures = self._read()
        # A failed reading fails no scrape: the counters are still worth having.
        except (psycopg.Error, OSError, NotInstalledHere, RuntimeError) as exc:
            if self._readable is not False:
                log.warning("metrics_status_failed", error=f"{type(exc).__name__}: {exc}")
            self._readable = False
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return None
        if self._readable is False:
            log.info("metrics_status_readable")
        self._readable = True
        return figures

    def _read(self) -> Figures:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._mode.figures(self._conn)

    def close(self) -> None:
        # Never under a reading; one that hangs is left to the exit (a daemon thread).
        with self._lock:
            reading = self._reading
        if reading is not None:
            reading.join(READING_WAIT_S)
            if reading.is_alive():
                return
        if self._conn is not None:
            self._conn.close()
            self._conn = None
