"""Phase 9, sweeps: `TRUNCATE sweep_orders` (two templates, so one sweep of two patterns)
while Redis holds N unrelated keys (DEBUG POPULATE: 1M and 10M; --quick 100k), and a
single-row UPDATE of another table committed while the sweep runs (once Redis has
counted its first SCAN).

Reported per N:
- the sweep's time: from the TRUNCATE's COMMIT until the listener logs `sweep_completed`;
- the head-of-line delay: from the concurrent UPDATE's COMMIT until both its keys are
  gone, and whether the sweep was still running then;
- Redis's latency as a client sees it: a GET loop on its own connection, its p50 and
  p99 before the TRUNCATE (one second, idle) and during the sweep.

The listener runs with default settings, its second deletes too.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from datetime import datetime
from multiprocessing import synchronize as mp_sync
from multiprocessing.connection import Connection

import redis
from psycopg import sql

from harness import DRAIN, SWEPT, Bench, Listener, Target, user_keys
from procs import wait_for, wait_idle
from report import Row

ORDER_ROWS = 1_000  # keys of the swept table: order:{id} and order:by_email:{email}
CONCURRENT_ID = 1  # the row of DRAIN the concurrent UPDATE changes
IDLE_S = 1.0
# Target (issue 17): a change committed during a sweep is deleted as fast as if none ran.
HEAD_OF_LINE_TARGET_MS = 100.0


def _probe_loop(url: str, stop: mp_sync.Event, out: Connection) -> None:
    """GETs in a loop until `stop`, about 1,000 a second (a busy app's share, not a
    flood): (time.monotonic(), seconds) each, sent back at the end."""
    client = redis.Redis.from_url(url)
    samples: list[tuple[float, float]] = []
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            client.get("probe")
            samples.append((t0, time.monotonic() - t0))
            time.sleep(0.001)
    finally:
        client.close()
        out.send(samples)
        out.close()


class Probe:
    """Redis's latency as a client sees it, from a process of its own (a thread would
    share this one's interpreter lock with the waits below, and time them too)."""

    def __init__(self, url: str) -> None:
        self._stop = mp.Event()
        self._recv, send = mp.Pipe(duplex=False)
        self._proc = mp.Process(target=_probe_loop, args=(url, self._stop, send), daemon=True)
        self.samples: list[tuple[float, float]] = []

    def start(self) -> None:
        self._proc.start()

    def stop(self) -> None:
        self._stop.set()
        if self._recv.poll(30):
            self.samples = self._recv.recv()
        self._proc.join(10)

    def between(self, start: float, end: float) -> list[float]:
        return [s for t, s in self.samples if start <= t <= end]


def quantile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Sweep:
    unrelated_keys: int
    sweep_s: float  # TRUNCATE's COMMIT -> `sweep_completed` logged
    head_of_line_ms: float  # the concurrent UPDATE's COMMIT -> both its keys gone
    overlapped: bool  # the UPDATE's keys were gone while the sweep still ran
    idle_p50_ms: float
    idle_p99_ms: float
    sweep_p50_ms: float
    sweep_p99_ms: float
    gets_during: int


def scans(bench: Bench) -> int:
    return int(bench.redis.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def sweep_done_at(listener: Listener, after_wall: float) -> float | None:
    """time.monotonic() of the first `sweep_completed` line logged after `after_wall`
    (a first sweep: a second one, second_delete_ms later, is not the sweep's time)."""
    for event in listener.events():
        if event.get("event") != "sweep_completed" or event.get("second"):
            continue
        wall = datetime.fromisoformat(str(event["timestamp"])).timestamp()
        if wall >= after_wall:
            return wall - (time.time() - time.monotonic())
    return None


def load(bench: Bench, unrelated: int) -> None:
    bench.redis.flushall()
    bench.redis.execute_command("DEBUG", "POPULATE", unrelated, "junk", 16)
    pipe = bench.redis.pipeline(transaction=False)
    for i in range(1, ORDER_ROWS + 1):
        pipe.set(f"order:{i}", "cached")
        pipe.set(f"order:by_email:u{i}@example.com", "cached")
    pipe.set("probe", "x")
    pipe.execute()
    bench.redis.mset(dict.fromkeys(user_keys(CONCURRENT_ID), "cached"))


def one_sweep(bench: Bench, listener: Listener, target: Target, unrelated: int) -> Sweep:
    load(bench, unrelated)
    wait_idle(listener.pid)
    probe = Probe(bench.rs.url)
    probe.start()
    try:
        time.sleep(IDLE_S)  # the idle latency's sample, before the TRUNCATE
        scanned = scans(bench)
        truncate_wall = time.time()
        target.admin.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(SWEPT)))
        truncated = time.monotonic()
        wait_for(lambda: scans(bench) > scanned, 60, "the sweep's first SCAN", 0.001)
        target.admin.execute(
            sql.SQL("UPDATE {} SET n = n + 1 WHERE id = %s").format(sql.Identifier(DRAIN)),
            (CONCURRENT_ID,),
        )
        updated = time.monotonic()
        keys = user_keys(CONCURRENT_ID)

        def change_gone() -> bool:
            listener.check()
            return bench.redis.exists(*keys) == 0

        gone = wait_for(change_gone, 600, "the concurrent change's keys", 0.001)
        overlapped = sweep_done_at(listener, truncate_wall) is None

        def swept() -> bool:
            listener.check()
            return sweep_done_at(listener, truncate_wall) is not None

        wait_for(swept, 1800, "sweep_completed", 0.05)
        done = sweep_done_at(listener, truncate_wall)
        assert done is not None
    finally:
        probe.stop()
    idle = probe.between(truncated - IDLE_S, truncated)
    during = probe.between(truncated, done)
    return Sweep(
        unrelated_keys=unrelated,
        sweep_s=done - truncated,
        head_of_line_ms=(gone - updated) * 1000,
        overlapped=overlapped,
        idle_p50_ms=quantile_ms(idle, 0.5),
        idle_p99_ms=quantile_ms(idle, 0.99),
        sweep_p50_ms=quantile_ms(during, 0.5),
        sweep_p99_ms=quantile_ms(during, 0.99),
        gets_during=len(during),
    )


def measure_sweeps(bench: Bench, key_counts: tuple[int, ...], target: Target) -> list[Sweep]:
    listener = Listener(bench, f"{target.mode}-sweep", target)
    try:
        listener.wait_started()
        results = []
        for unrelated in key_counts:
            result = one_sweep(bench, listener, target, unrelated)
            print(
                f"  [{target.mode}] sweep among {unrelated:,} keys: {result.sweep_s:.2f} s, "
                f"concurrent change {result.head_of_line_ms:.1f} ms, Redis p99 "
                f"{result.idle_p99_ms:.2f} -> {result.sweep_p99_ms:.2f} ms",
                flush=True,
            )
            results.append(result)
    finally:
        listener.stop()
        bench.redis.flushall()
    return results


def sweep_rows(sweeps: list[Sweep]) -> list[Row]:
    """The phase's rows (without the mode prefix)."""
    rows: list[Row] = []
    for s in sweeps:
        name = f"TRUNCATE sweep among {s.unrelated_keys:,} unrelated keys"
        rows += [
            Row(f"{name}: COMMIT → sweep done", f"{s.sweep_s:.2f} s", "", "", "", None),
            Row(
                f"{name}: a change committed during it, COMMIT → keys deleted"
                + ("" if s.overlapped else " (after the sweep ended)"),
                f"{s.head_of_line_ms:.1f} ms",
                "",
                "",
                f"≤ {HEAD_OF_LINE_TARGET_MS:.0f} ms, during the sweep",
                s.overlapped and s.head_of_line_ms <= HEAD_OF_LINE_TARGET_MS,
            ),
            Row(
                f"{name}: Redis GET latency p50 / p99, during the sweep vs idle",
                f"{s.sweep_p50_ms:.2f} / {s.sweep_p99_ms:.2f} ms",
                f"{s.idle_p50_ms:.2f} / {s.idle_p99_ms:.2f} ms",
                f"{s.sweep_p99_ms / s.idle_p99_ms:.2f}x" if s.idle_p99_ms else "",
                "",
                None,
            ),
        ]
    return rows
