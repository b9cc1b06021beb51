"""Phase 6: what second deletes (`second_delete_ms`) cost, against the same listener with
them off (`second_delete_ms = 0`), every other setting at its default:

- steady writes: pgbench at a fixed rate (STEADY_TPS single-row UPDATEs a second, 2
  clients) for the write phase's length, once per setting: the listener's CPU per change
  (its process and its backends), and Redis's UNLINK commands and their server time per
  change (INFO commandstats), counted until the second deletes owed are done;
- a backlog drain of the drain phase's size: the time until every key is gone, the
  listener's CPU, and the UNLINK commands until it stopped (a listener does the second
  deletes it still owes on its way out, so all of them are counted).

No floor: the figure is the ratio of on to off. "On" is the default setting, or
ON_IF_OFF_MS if second deletes are off by default.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass

import psycopg

from cdc_invalidator.settings import Settings
from harness import DRAIN, W_WATCHED, Bench, Listener, Sizes, Target
from phases.drain import clear_history, drain_ours, queue_updates
from phases.writes import catch_up, listener_backends, pgbench
from procs import proc_cpu_s, wait_idle
from report import Row, fmt_ratio

STEADY_TPS = 1_000
ON_IF_OFF_MS = 300


@dataclass
class Cost:
    second_delete_ms: int
    changes: int
    listener_us_per_change: float
    backend_us_per_change: float
    unlinks_per_change: float
    redis_unlink_us_per_change: float
    drain_s: float
    drain_cpu_s: float
    drain_unlinks: int


def on_ms() -> int:
    default = Settings.model_fields["second_delete_ms"].default
    return int(default) if default else ON_IF_OFF_MS


def unlink_stats(bench: Bench) -> tuple[int, int]:
    """UNLINK commands Redis ran so far, and their server time in µs."""
    stats = bench.redis.info("commandstats").get("cmdstat_unlink", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def with_setting(target: Target, second_delete_ms: int) -> Target:
    """The target with a config of its own: the target's (every table the phases added),
    second_delete_ms first (a top-level key, before any table)."""
    config = target.config.with_name(f"{target.mode}-second-delete-{second_delete_ms}.toml")
    config.write_text(f"second_delete_ms = {second_delete_ms}\n" + target.config.read_text())
    return dataclasses.replace(target, config=config)


def measure_cost(bench: Bench, sizes: Sizes, base: Target, second_delete_ms: int) -> Cost:
    target = with_setting(base, second_delete_ms)
    dbname = str(psycopg.conninfo.conninfo_to_dict(target.dsn)["dbname"])
    name = f"{target.mode}-second-delete-{second_delete_ms}"
    listener = Listener(bench, name, target)
    try:
        listener.wait_started()
        catch_up(bench, target, listener)  # (logical mode: past a change of ours)
        time.sleep(second_delete_ms / 1000)  # the catch-up's own second deletes
        wait_idle(listener.pid)
        backends = listener_backends(bench, target)
        cpu0, backend0 = listener.cpu_s(), sum(proc_cpu_s(pid) for pid in backends)
        calls0, usec0 = unlink_stats(bench)
        _, changes = pgbench(bench, W_WATCHED, sizes.write_s, dbname, rate=STEADY_TPS)
        time.sleep(second_delete_ms / 1000)  # the last second deletes fall due
        wait_idle(listener.pid)
        cpu = listener.cpu_s() - cpu0
        backend_cpu = sum(proc_cpu_s(pid) for pid in backends) - backend0
        calls1, usec1 = unlink_stats(bench)
    finally:
        listener.stop()
    rows = sizes.drain_rows
    bench.redis.flushall()
    # The drain phase's backlog, without its floor's slot (no floor here).
    clear_history(bench, target)
    queue_updates(bench, DRAIN, rows, target)
    bench.quiesce(target, DRAIN)
    bench.set_keys(range(1, rows + 1))
    before, _ = unlink_stats(bench)
    drain = drain_ours(bench, f"{name}-drain", rows, target)
    after, _ = unlink_stats(bench)
    per = 1 / max(changes, 1)
    return Cost(
        second_delete_ms=second_delete_ms,
        changes=changes,
        listener_us_per_change=1e6 * cpu * per,
        backend_us_per_change=1e6 * backend_cpu * per,
        unlinks_per_change=(calls1 - calls0) * per,
        redis_unlink_us_per_change=(usec1 - usec0) * per,
        drain_s=drain.keys_gone_s,
        drain_cpu_s=drain.cpu_s,
        drain_unlinks=after - before,
    )


def measure_second_deletes(bench: Bench, sizes: Sizes, target: Target) -> tuple[Cost, Cost]:
    """(on, off), each with a config of its own."""
    on = measure_cost(bench, sizes, target, on_ms())
    off = measure_cost(bench, sizes, target, 0)
    for cost in (on, off):
        print(f"  [{target.mode}] second deletes: {asdict(cost)}", flush=True)
    return on, off


def second_delete_rows(on: Cost, off: Cost) -> list[Row]:
    """Reported, not judged: the cost of the default protection against the stale-set race."""
    label = f"second_delete_ms = {on.second_delete_ms} vs 0"

    def row(metric: str, ours: str, floor: str, ratio: float | None) -> Row:
        return Row(
            f"{label}: {metric}", ours, floor, "" if ratio is None else fmt_ratio(ratio), "", None
        )

    cpu_on = on.listener_us_per_change + on.backend_us_per_change
    cpu_off = off.listener_us_per_change + off.backend_us_per_change
    return [
        row(
            f"listener CPU per change at {STEADY_TPS:,} writes/s, process + backends",
            f"{on.listener_us_per_change:.0f} + {on.backend_us_per_change:.0f} µs",
            f"{off.listener_us_per_change:.0f} + {off.backend_us_per_change:.0f} µs",
            cpu_on / cpu_off if cpu_off else None,
        ),
        row(
            "UNLINK commands per change",
            f"{on.unlinks_per_change:.2f}",
            f"{off.unlinks_per_change:.2f}",
            on.unlinks_per_change / off.unlinks_per_change if off.unlinks_per_change else None,
        ),
        row(
            "Redis UNLINK time per change",
            f"{on.redis_unlink_us_per_change:.1f} µs",
            f"{off.redis_unlink_us_per_change:.1f} µs",
            on.redis_unlink_us_per_change / off.redis_unlink_us_per_change
            if off.redis_unlink_us_per_change
            else None,
        ),
        row(
            "backlog drain, every key gone",
            f"{on.drain_s:.3f} s (CPU {on.drain_cpu_s:.2f} s, {on.drain_unlinks:,} UNLINKs)",
            f"{off.drain_s:.3f} s (CPU {off.drain_cpu_s:.2f} s, {off.drain_unlinks:,} UNLINKs)",
            on.drain_s / off.drain_s if off.drain_s else None,
        ),
    ]
