"""Phase 1, commit -> key-deleted latency at ~300 single-row UPDATE commits per second.

(a) The floor of the capture mode: in trigger mode, a row trigger sends the keys in a
pg_notify payload to a minimal psycopg 3 listener that UNLINKs them (floor_listener.py);
in logical mode, a minimal pgoutput consumer of a slot and publication of its own
decodes the key columns, UNLINKs them and acknowledges (floor_logical.py). (b) The real
listener, `python -m cdc_invalidator run` with default settings. In trigger mode, the
same run again with `notify_payload = true` installed (a one-row statement's row in its
NOTIFY payload, deleted before the queue read), against a floor measured beside it the
same way; the default capture functions are installed again after it. Both run side by side
and the commits alternate between their tables in half-second blocks, so that both see
the same machine. "Deleted" is the same clock for both: a separate process (keywatch.py)
receives Redis keyspace notifications (`del`) and timestamps them with CLOCK_MONOTONIC;
the commit time is taken in the writer just after COMMIT returned. A sample's latency is
the time until both of its row's keys were gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from floors import start_floor_listener, stop_floor_listener
from harness import (
    CONTROL_CHANNEL,
    KEYWATCH,
    LAT_FLOOR,
    LAT_OURS,
    Bench,
    Listener,
    Sizes,
    Target,
    user_keys,
)
from procs import proc_cpu_s, read_ready, stop_process, wait_for
from report import Row, fmt_ms, fmt_ratio

# The p50 and p99 targets per capture mode, as ratios to the floor's (issue 14).
P50_TARGETS = {"trigger": 1.3, "logical": 1.3}
P99_TARGETS = {"trigger": 2.0, "logical": 2.0}


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float
    mean_ms: float
    samples: int
    sent: int
    listener_cpu_us: float  # listener process CPU per change, over the measured run


def paced_updates(
    bench: Bench,
    schedule: Sequence[tuple[str, int]],
    rate: int,
    commits: dict[int, int] | None,
    dsns: dict[str, str],
) -> float:
    """One single-row UPDATE per (table, id), each committed on its own, `rate` per second.

    The row's keys are SET first (a key that does not exist produces no `del`); the
    commit time is CLOCK_MONOTONIC just after the UPDATE's COMMIT returned. Returns the
    achieved rate.
    """
    queries = {
        table: sql.SQL("UPDATE {} SET n = n + 1 WHERE id = %s").format(sql.Identifier(table))
        for table in {table for table, _ in schedule}
    }
    period_ns = 1_000_000_000 / rate
    conns = {table: psycopg.connect(dsn, autocommit=True) for table, dsn in dsns.items()}
    try:
        for table, query in queries.items():
            conns[table].execute(query, (0,), prepare=True)
        start = time.monotonic_ns() + 20_000_000
        for n, (table, i) in enumerate(schedule):
            k1, k2 = user_keys(i)
            bench.redis.mset({k1: "cached", k2: "cached"})
            delay = start + n * period_ns - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            conns[table].execute(queries[table], (i,), prepare=True)
            if commits is not None:
                commits[i] = time.monotonic_ns()
        elapsed = (time.monotonic_ns() - start) / 1e9
    finally:
        for conn in conns.values():
            conn.close()
    return len(schedule) / elapsed if elapsed > 0 else float("nan")


def alternate(
    a: Sequence[tuple[str, int]], b: Sequence[tuple[str, int]], block: int
) -> list[tuple[str, int]]:
    """Blocks of `block` changes from a, then from b, and so on."""
    out: list[tuple[str, int]] = []
    for lo in range(0, max(len(a), len(b)), block):
        out += [*a[lo : lo + block], *b[lo : lo + block]]
    return out


def latency_ids(sizes: Sizes) -> tuple[range, range]:
    """Row ids of the floor's table and of ours: disjoint, so that their keys differ."""
    per_side = sizes.warmup + round(sizes.rate * sizes.latency_s)
    return range(1, per_side + 1), range(per_side + 1, 2 * per_side + 1)


def measure_latency(
    bench: Bench,
    sizes: Sizes,
    floor_proc: subprocess.Popen[Any],
    listener: Listener,
    target: Target,
) -> tuple[Latency, Latency]:
    """Both listeners run side by side; the changes alternate between their tables in
    half-second blocks, so that both see the same machine (whatever else runs on it)."""

    def check() -> None:
        listener.check()
        if floor_proc.poll() is not None:
            raise RuntimeError(f"floor listener exited {floor_proc.returncode}")

    bench.redis.flushall()
    floor_ids, our_ids = latency_ids(sizes)
    floor_changes = [(LAT_FLOOR, i) for i in floor_ids]
    our_changes = [(LAT_OURS, i) for i in our_ids]
    block = max(1, sizes.rate // 2)
    w = sizes.warmup
    dsns = {LAT_FLOOR: target.dsn, LAT_OURS: target.dsn}
    warmup = alternate(floor_changes[:w], our_changes[:w], block)
    paced_updates(bench, warmup, sizes.rate, None, dsns)
    # Untimed, and long enough for a logical slot that must first read past the WAL the
    # earlier phases wrote in the other database (the CPU-bound write rounds write
    # millions of rows): the warm-up is what lets both consumers catch up.
    wait_for(lambda: bench.dbsize() == 0, 300, "warm-up keys deleted")
    schedule = alternate(floor_changes[w:], our_changes[w:], block)
    commits, deleted, cpu = timed_run(
        bench,
        schedule,
        sizes.rate,
        dsns,
        check=check,
        cpu=lambda: (proc_cpu_s(floor_proc.pid), listener.cpu_s()),
    )
    return (
        _latency(commits, deleted, floor_ids[w:], cpu[0]),
        _latency(commits, deleted, our_ids[w:], cpu[1]),
    )


def measure_payload_latency(bench: Bench, sizes: Sizes, target: Target) -> tuple[Latency, Latency]:
    """Trigger mode, measure_latency with `notify_payload = true` installed: (floor, ours).
    The target's own config is installed again afterwards, so that the later phases
    measure the defaults."""
    config = target.config.with_name(f"{target.mode}-notify-payload.toml")
    config.write_text("notify_payload = true\n" + target.config.read_text())
    payload = dataclasses.replace(target, config=config)
    bench.cli(payload, "install")
    try:
        floor_proc = start_floor_listener(bench, payload)
        try:
            listener = Listener(bench, f"{target.mode}-latency-payload", payload)
            try:
                listener.wait_started()
                return measure_latency(bench, sizes, floor_proc, listener, payload)
            finally:
                listener.stop()
        finally:
            stop_floor_listener(payload, floor_proc)
    finally:
        bench.cli(target, "install")


def timed_run(  # noqa: PLR0913 - the run's parts; the two callbacks keyword-only
    bench: Bench,
    schedule: list[tuple[str, int]],
    rate: int,
    dsns: dict[str, str],
    *,
    check: Callable[[], None],
    cpu: Callable[[], tuple[float, float]],
) -> tuple[dict[int, int], dict[str, int], tuple[float, float]]:
    """The timed part of a side-by-side latency run: the deletion clock started
    (keywatch.py), the schedule's commits paced, every key awaited (`check` raises if a
    side died; a key still there after 10 s counts as lost), and the deletion times read
    back. Returns (commit times, deletion times, each side's CPU seconds over the run,
    as `cpu()` reads them)."""
    bench.keyspace_events(True)
    watch = bench.spawn(
        [sys.executable, str(KEYWATCH), str(bench.rs.port), "user:*"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        read_ready(watch, "keywatch")
        commits: dict[int, int] = {}
        cpu0 = cpu()
        paced_updates(bench, schedule, rate, commits, dsns)

        def all_gone() -> bool:
            check()
            return bench.dbsize() == 0

        with contextlib.suppress(TimeoutError):
            wait_for(all_gone, 10, "keys deleted", interval_s=0.01)
        cpu1 = cpu()
        bench.redis.publish(CONTROL_CHANNEL, "dump")
        assert watch.stdout is not None
        deleted: dict[str, int] = json.loads(watch.stdout.readline())
        watch.wait(10)
    finally:
        stop_process(watch)
        bench.keyspace_events(False)
    return commits, deleted, (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def _latency(commits: dict[int, int], deleted: dict[str, int], ids: range, cpu: float) -> Latency:
    latencies: list[float] = []
    for i in ids:
        k1, k2 = user_keys(i)
        if k1 in deleted and k2 in deleted:
            latencies.append((max(deleted[k1], deleted[k2]) - commits[i]) / 1e6)
    latencies.sort()
    if not latencies:
        raise RuntimeError("no key was deleted")
    return Latency(
        p50_ms=quantile(latencies, 0.50),
        p99_ms=quantile(latencies, 0.99),
        max_ms=latencies[-1],
        min_ms=latencies[0],
        mean_ms=statistics.fmean(latencies),
        samples=len(latencies),
        sent=len(ids),
        listener_cpu_us=1e6 * cpu / len(ids),
    )


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_rows(
    mode: str, rate: int, floor: Latency, ours: Latency, variant: str = ""
) -> list[Row]:
    """The latency run's rows (without the mode prefix); a `variant` (" with
    notify_payload") is appended to each name, which stays as it was without one."""
    p50_target, p99_target = P50_TARGETS[mode], P99_TARGETS[mode]
    rows = [
        Row(
            f"commit→deleted p50 @{rate:.0f}/s",
            fmt_ms(ours.p50_ms),
            fmt_ms(floor.p50_ms),
            fmt_ratio(ours.p50_ms / floor.p50_ms),
            f"≤ {p50_target:g}x floor",
            ours.p50_ms <= p50_target * floor.p50_ms,
        ),
        Row(
            "commit→deleted p99",
            fmt_ms(ours.p99_ms),
            fmt_ms(floor.p99_ms),
            fmt_ratio(ours.p99_ms / floor.p99_ms),
            f"≤ {p99_target:g}x floor",
            ours.p99_ms <= p99_target * floor.p99_ms,
        ),
        Row(
            "commit→deleted max",
            fmt_ms(ours.max_ms),
            fmt_ms(floor.max_ms),
            fmt_ratio(ours.max_ms / floor.max_ms),
            "",
            None,
        ),
        Row(
            "changes whose keys were deleted",
            f"{ours.samples}/{ours.sent}",
            f"{floor.samples}/{floor.sent}",
            "",
            "all",
            ours.samples == ours.sent,
        ),
        Row(
            "listener CPU per change in the latency run",
            f"{ours.listener_cpu_us:.0f} µs",
            f"{floor.listener_cpu_us:.0f} µs",
            fmt_ratio(ours.listener_cpu_us / floor.listener_cpu_us)
            if floor.listener_cpu_us
            else "",
            "",
            None,
        ),
    ]
    return [dataclasses.replace(row, metric=row.metric + variant) for row in rows]
