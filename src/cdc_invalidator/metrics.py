"""Prometheus metrics of one listener, in a registry of its own (no global state).

The runner counts as it goes; what only the database knows (the trigger queue's
backlog, the slot's lag) is read when Prometheus scrapes, on a connection of the
scraping thread's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cdc_invalidator.status import read_logical_status, read_status

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
        self.batches = Counter(f"{PREFIX}_batches", "Batches acknowledged", registry=r)
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters", "Events parked as dead letters", registry=r
        )
        self.unrenderable_sweeps = Counter(
            f"{PREFIX}_unrenderable_sweeps",
            "Sweeps of a table's key templates standing for changes whose keys could not "
            "be rendered (a key column was dropped), per batch and table",
            registry=r,
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

    def watch_database(self, collector: Collector) -> None:
        self.registry.register(collector)


class BacklogCollector(Collector):
    """Backlog (trigger mode) or slot lag (logical mode), read at scrape time."""

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], capture: str, slot: str
    ) -> None:
        self._connect = connect
        self._capture = capture
        self._slot = slot
        self._conn: psycopg.Connection[Any] | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # not known before the first scrape: no description at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            f"{PREFIX}_status_up", "1 if the backlog or slot figures below could be read"
        )
        try:
            figures = self._read()
        except (psycopg.Error, OSError) as exc:
            log.debug("metrics_status_failed", error=str(exc))
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, help_, value in figures:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_)
            family.add_metric([], value)
            yield family

    def _read(self) -> list[tuple[str, str, float]]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        if self._capture == "logical":
            s = read_logical_status(self._conn, self._slot)
            out = [
                (
                    "slot_lag_bytes",
                    "WAL written since the position the listener confirmed, in bytes",
                    float(s.slot_lag_bytes or 0),
                ),
                (
                    "slot_active",
                    "1 while a listener streams the slot",
                    float(s.slot_active_pid is not None),
                ),
            ]
            if s.safe_wal_size_bytes is not None:
                out.append(
                    (
                        "slot_safe_wal_bytes",
                        "WAL left before max_slot_wal_keep_size invalidates the slot",
                        float(s.safe_wal_size_bytes),
                    )
                )
            return out
        t = read_status(self._conn)
        return [
            ("dead_letters_stored", "Rows in dead_letter_v1", float(t.dead_letters)),
            ("backlog_events", "Queued changes not acknowledged yet", float(t.backlog)),
            (
                "oldest_pending_seconds",
                "Age of the oldest change not acknowledged yet",
                float(t.oldest_pending_age_s or 0.0),
            ),
            (
                "notify_queue_usage",
                "pg_notification_queue_usage(): 1.0 blocks commits",
                float(t.notify_queue_usage),
            ),
        ]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
