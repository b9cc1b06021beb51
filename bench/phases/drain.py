"""Phase 2, backlog drain: N row changes (2N keys) queued while the listener was stopped,
then the listener started and timed until every key is gone (and, reported apart, until
the queue table is empty: a design may delete processed rows later).

Floor: one Python process SELECTs the key columns of those rows and UNLINKs the keys in
a hiredis pipeline, one UNLINK per row of its two keys: the honest minimal floor (no
batching across changes). A batched variant, 1,000 keys per UNLINK, is reported too.
Peak RSS of the listener (VmHWM). `--big` adds a 1M-change backlog.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

from floors import drain_floor
from harness import Bench, Listener, Target
from procs import wait_for
from report import Row, fmt_ratio


@dataclass
class Drain:
    rows: int
    floor_s: float  # SELECT + one UNLINK per row (its two keys), pipelined
    batched_floor_s: float  # SELECT + UNLINK of 1,000 keys per command, pipelined
    ours_s: float  # from the listener's `listener_started` line until every key is gone
    ours_with_start_s: float  # from spawning the process (interpreter start, imports)
    queue_empty_s: float | None  # until the queue table is empty too (None: not in time)
    queue_left: int
    prune_rate: float | None
    listener_cpu_s: float
    peak_rss_mb: float
    floor_runs: list[float]
    batched_floor_runs: list[float]
    ours_runs: list[float]


def queue_updates(bench: Bench, table: str, rows: int, target: Target) -> None:
    """Change every row, 10k rows per transaction, with our capture installed (the slot
    keeps them in logical mode)."""
    query = sql.SQL("UPDATE {} SET n = n + 1 WHERE id BETWEEN %s AND %s").format(
        sql.Identifier(table)
    )
    before = 0 if target.logical else bench.queue_len(table)
    for lo in range(1, rows + 1, 10_000):
        target.admin.execute(query, (lo, min(rows, lo + 9_999)))
    if target.logical:
        return
    if (queued := bench.queue_len(table) - before) != rows:
        raise RuntimeError(f"expected {rows} queued events for {table}, found {queued}")


@dataclass
class DrainRun:
    keys_gone_s: float  # from the listener's `listener_started` line
    with_start_s: float  # from spawning the process
    queue_empty_s: float | None  # queue table empty, from listener_started (None: not yet)
    queue_left: int  # queue rows left when we stopped waiting for it to empty
    prune_rate: float | None  # rows/s the queue shrank by after the keys were gone
    cpu_s: float
    peak_rss_mb: float


QUEUE_EMPTY_WAIT_S = 10.0


def drain_ours(
    bench: Bench,
    name: str,
    rows: int,
    target: Target,
    dbsize: Callable[[], int] | None = None,
) -> DrainRun:
    """Start the listener on a full queue; time it until every key is gone (`dbsize`:
    how many keys are left, by default in the single Redis).

    Then wait up to QUEUE_EMPTY_WAIT_S more for the queue table to be empty: a design
    that deletes processed rows later (in bulk) drains the keys first.
    """
    listener = Listener(bench, name, target)
    count_keys = dbsize or bench.dbsize
    try:

        def drained() -> bool:
            listener.check()
            return count_keys() == 0

        keys_gone = wait_for(drained, max(120, rows / 2000), "keys deleted", 0.01)
        queue_empty: float | None = None
        left_then = left_now = 0
        t_then = time.monotonic()
        if not target.logical:  # no queue table in logical mode
            left_then = bench.queue_total()
            with contextlib.suppress(TimeoutError):
                queue_empty = wait_for(bench.queue_empty, QUEUE_EMPTY_WAIT_S, "queue empty", 0.01)
            left_now = bench.queue_total()
        cpu = listener.cpu_s()
        rss = listener.peak_rss_mb()
        started = listener.started_at()
    finally:
        listener.stop()
    if started is None:
        raise RuntimeError("no listener_started line")
    return DrainRun(
        keys_gone_s=keys_gone - started,
        with_start_s=keys_gone - listener.popen_at,
        queue_empty_s=None if queue_empty is None else queue_empty - started,
        queue_left=left_now,
        prune_rate=(left_then - left_now) / (time.monotonic() - t_then) if left_then else None,
        cpu_s=cpu,
        peak_rss_mb=rss,
    )


def best_drain(rows: int, floors: list[float], batched: list[float], runs: list[DrainRun]) -> Drain:
    """The best of the repeated runs, against the best of each floor."""
    best = min(runs, key=lambda r: r.keys_gone_s)
    return Drain(
        rows=rows,
        floor_s=min(floors),
        batched_floor_s=min(batched),
        ours_s=best.keys_gone_s,
        ours_with_start_s=best.with_start_s,
        queue_empty_s=best.queue_empty_s,
        queue_left=best.queue_left,
        prune_rate=best.prune_rate,
        listener_cpu_s=best.cpu_s,
        peak_rss_mb=max(r.peak_rss_mb for r in runs),
        floor_runs=floors,
        batched_floor_runs=batched,
        ours_runs=[r.keys_gone_s for r in runs],
    )


def measure_drain(bench: Bench, table: str, rows: int, repeats: int, target: Target) -> Drain:
    floors: list[float] = []
    batched: list[float] = []
    runs: list[DrainRun] = []
    ids = range(1, rows + 1)
    for n in range(repeats):
        bench.redis.flushall()
        bench.set_keys(ids)
        bench.quiesce(target, table)
        floors.append(drain_floor(bench, table, 1, target.dsn))
        bench.set_keys(ids)
        batched.append(drain_floor(bench, table, 1000, target.dsn))
        bench.set_keys(ids)
        if not target.logical:
            bench.admin.execute("TRUNCATE cdc_invalidator.queue_v1")  # earlier phases' rows
        queue_updates(bench, table, rows, target)
        if target.logical:
            bench.quiesce(target, table)
        else:
            bench.quiesce(target, "cdc_invalidator.queue_v1", table)
        run = drain_ours(bench, f"{target.mode}-drain-{rows}-{n}", rows, target)
        runs.append(run)
        if target.logical:
            empty = "n/a (slot)"
        elif run.queue_empty_s is not None:
            empty = f"empty after {run.queue_empty_s:.3f} s"
        else:
            empty = f"{run.queue_left} rows left after {QUEUE_EMPTY_WAIT_S:g} s more"
        print(
            f"  [{target.mode}] drain {rows}: floor {floors[-1]:.3f} s "
            f"(batched {batched[-1]:.3f} s), ours "
            f"{run.keys_gone_s:.3f} s ({run.with_start_s:.3f} s with process start), queue "
            f"{empty}, listener CPU {run.cpu_s:.2f} s, peak RSS {run.peak_rss_mb:.1f} MB",
            flush=True,
        )
    return best_drain(rows, floors, batched, runs)


def drain_rows(mode: str, drain: Drain, big: Drain | None) -> list[Row]:
    """The backlog drain's rows (without the mode prefix)."""
    rows: list[Row] = []
    for d, target in ((drain, True), (big, False)):
        if d is None:
            continue
        label = f"{d.rows // 1000}k" if d.rows < 1_000_000 else f"{d.rows / 1e6:g}M"
        keys = f"{2 * d.rows // 1000}k" if d.rows < 500_000 else f"{2 * d.rows / 1e6:g}M"
        rows += [
            Row(
                f"backlog drain {label} changes / {keys} keys",
                f"{d.ours_s:.3f} s",
                f"{d.floor_s:.3f} s",
                fmt_ratio(d.ours_s / d.floor_s),
                "≤ 2x floor" if target else "",
                d.ours_s <= 2 * d.floor_s if target else None,
            ),
            Row(
                f"drain {label}: vs batched-UNLINK floor",
                f"{d.ours_s:.3f} s",
                f"{d.batched_floor_s:.3f} s",
                fmt_ratio(d.ours_s / d.batched_floor_s),
                "",
                None,
            ),
            Row(
                f"drain {label}: rate",
                f"{d.rows / d.ours_s:,.0f} changes/s",
                f"{d.rows / d.floor_s:,.0f} rows/s",
                "",
                "",
                None,
            ),
            Row(
                f"drain {label}: incl. process start",
                f"{d.ours_with_start_s:.3f} s",
                "",
                "",
                "",
                None,
            ),
            *[
                Row(
                    f"drain {label}: queue table empty",
                    f"{d.queue_empty_s:.3f} s"
                    if d.queue_empty_s is not None
                    else f"not {QUEUE_EMPTY_WAIT_S:g} s after the keys: {d.queue_left:,} rows left"
                    + ("" if d.prune_rate is None else f", pruned at {d.prune_rate:,.0f} rows/s"),
                    "",
                    "",
                    "",
                    None,
                )
            ][: 0 if mode == "logical" else 1],
            Row(
                f"drain {label}: listener CPU",
                f"{d.listener_cpu_s:.2f} s",
                "",
                "",
                "",
                None,
            ),
            Row(
                f"listener peak RSS, drain {label}",
                f"{d.peak_rss_mb:.1f} MB",
                "",
                "",
                "< 150 MB" if target else "",
                d.peak_rss_mb < 150 if target else None,
            ),
        ]
    return rows
