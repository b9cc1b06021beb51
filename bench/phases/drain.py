"""Phase 2, backlog drain: N row changes (2N keys) captured while the listener was
stopped, then the listener started and timed from its `listener_started` log line until
every key is gone.

Floor (floors.drain_floor), from the same changes, packing its UNLINKs as the listener
does (500 keys per command, one hiredis pipeline): in trigger mode one Python process
SELECTs the key columns of the changed rows; in logical mode it streams a pgoutput slot
of its own, created on the listener's publication before the changes, and decodes only
the key columns (floor_logical.py), acknowledging after each read's deletes. Peak RSS of
the listener (VmHWM). `--big` adds a 1M-change backlog.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

from floors import create_floor_slot, drain_floor
from harness import Bench, Listener, Target
from procs import wait_for
from report import Row, fmt_ratio

# Targets (issue 14): the drain's time as a ratio to the floor's (the 100k drain and the
# cluster drain), and the listener's peak RSS in any drain (the 1M one too).
DRAIN_TARGET = 1.5
RSS_TARGET_MB = 100


@dataclass
class Drain:
    rows: int
    floor_s: float  # the floor's reads + UNLINK of 500 keys per command, pipelined
    ours_s: float  # from the listener's `listener_started` line until every key is gone
    ours_with_start_s: float  # from spawning the process (interpreter start, imports)
    listener_cpu_s: float
    peak_rss_mb: float
    floor_runs: list[float]
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
    cpu_s: float
    peak_rss_mb: float


def drain_ours(
    bench: Bench,
    name: str,
    rows: int,
    target: Target,
    dbsize: Callable[[], int] | None = None,
) -> DrainRun:
    """Start the listener on a full queue (or slot); time it until every key is gone
    (`dbsize`: how many keys are left, by default in the single Redis)."""
    listener = Listener(bench, name, target)
    count_keys = dbsize or bench.dbsize
    try:

        def drained() -> bool:
            listener.check()
            return count_keys() == 0

        keys_gone = wait_for(drained, max(120, rows / 2000), "keys deleted", 0.01)
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
        cpu_s=cpu,
        peak_rss_mb=rss,
    )


def best_drain(rows: int, floors: list[float], runs: list[DrainRun]) -> Drain:
    """The best of the repeated runs, against the best floor."""
    best = min(runs, key=lambda r: r.keys_gone_s)
    return Drain(
        rows=rows,
        floor_s=min(floors),
        ours_s=best.keys_gone_s,
        ours_with_start_s=best.with_start_s,
        listener_cpu_s=best.cpu_s,
        peak_rss_mb=max(r.peak_rss_mb for r in runs),
        floor_runs=floors,
        ours_runs=[r.keys_gone_s for r in runs],
    )


def clear_history(bench: Bench, target: Target) -> None:
    """Before a drain, no history of earlier listeners: trigger mode's queue (its
    processed rows are the history), logical mode's history_v1. A listener starts by
    redoing the second deletes its predecessor may have died owing, from the history of
    that one's last seconds: an earlier round's (the same rows) deleted every key of the
    next round before its drain did (100,000 events redone in 0.50 s, which was then
    timed as the drain)."""
    if target.logical:
        target.admin.execute("TRUNCATE cdc_invalidator.history_v1")
    else:
        bench.admin.execute("TRUNCATE cdc_invalidator.queue_v1")


def prepare_backlog(bench: Bench, table: str, rows: int, target: Target) -> None:
    """Change every row with no listener running; the floor's slot (logical mode) is
    created first, so that it sees the same changes as the listener's."""
    if target.logical:
        create_floor_slot(target)
    clear_history(bench, target)
    queue_updates(bench, table, rows, target)
    if target.logical:
        bench.quiesce(target, table)
    else:
        bench.quiesce(target, "cdc_invalidator.queue_v1", table)


def measure_drain(bench: Bench, table: str, rows: int, repeats: int, target: Target) -> Drain:
    floors: list[float] = []
    runs: list[DrainRun] = []
    ids = range(1, rows + 1)
    for n in range(repeats):
        bench.redis.flushall()
        prepare_backlog(bench, table, rows, target)
        bench.set_keys(ids)
        floors.append(drain_floor(bench, target, table, rows))
        bench.set_keys(ids)
        run = drain_ours(bench, f"{target.mode}-drain-{rows}-{n}", rows, target)
        runs.append(run)
        print(
            f"  [{target.mode}] drain {rows}: floor {floors[-1]:.3f} s, ours "
            f"{run.keys_gone_s:.3f} s ({run.with_start_s:.3f} s with process start), "
            f"listener CPU {run.cpu_s:.2f} s, peak RSS {run.peak_rss_mb:.1f} MB",
            flush=True,
        )
    return best_drain(rows, floors, runs)


def drain_rows(drain: Drain, big: Drain | None) -> list[Row]:
    """The backlog drain's rows (without the mode prefix): the time of the N-change drain
    is judged against the floor's, the peak RSS of both drains against RSS_TARGET_MB."""
    rows: list[Row] = []
    for d, timed in ((drain, True), (big, False)):
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
                f"≤ {DRAIN_TARGET:g}x floor" if timed else "",
                d.ours_s <= DRAIN_TARGET * d.floor_s if timed else None,
            ),
            Row(
                f"drain {label}: rate",
                f"{d.rows / d.ours_s:,.0f} changes/s",
                f"{d.rows / d.floor_s:,.0f} changes/s",
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
                f"≤ {RSS_TARGET_MB} MB",
                d.peak_rss_mb <= RSS_TARGET_MB,
            ),
        ]
    return rows
