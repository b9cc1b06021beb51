"""Phase 4, replay: N changes invalidated by the listener (history kept, as by default
for replay_history = 2h), the keys set again (a restored snapshot), then `cdc-invalidator
replay --since 15m` timed (its own figure, and with process start). Floor
(floors.replay_floor): the same history rows read back as text and each parsed once (the
queue's old_row and new_row in trigger mode, history_v1's batches in logical mode), a
pack's key columns rendered a template at a time, then the distinct keys UNLINKed 500 per
command in one hiredis pipeline. It runs first, on the same restored keys."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from floors import replay_floor
from harness import Bench, Target
from phases.drain import drain_ours, queue_updates
from report import Row, fmt_ratio


@dataclass
class Replay:
    events: int
    keys: int
    ours_s: float  # the replay itself, as the command reports it
    with_start_s: float  # the `replay --since 15m` command, process start included
    floor_s: float


WINDOW_S = 900
REPLAY_DONE = re.compile(
    r"replayed (\d+) invalidations .*\((\d+) keys and patterns deleted, in ([\d.]+) s\)"
)


def measure_replay(bench: Bench, table: str, rows: int, target: Target) -> Replay:
    """The listener invalidates `rows` changes with history kept; Redis gets the keys
    back (a restored snapshot); `replay --since 15m` deletes them again."""
    ids = range(1, rows + 1)
    bench.redis.flushall()
    bench.set_keys(ids)
    history = "history_v1" if target.logical else "queue_v1"
    target.admin.execute(f"TRUNCATE cdc_invalidator.{history}".encode())
    queue_updates(bench, table, rows, target)
    drain_ours(bench, f"{target.mode}-replay-history", rows, target)
    bench.set_keys(ids)  # the restore
    bench.quiesce(target, table)
    floor = replay_floor(bench, target, WINDOW_S)
    bench.set_keys(ids)  # the restore, again
    t0 = time.perf_counter()
    out = bench.cli(target, "replay", "--since", f"{WINDOW_S // 60}m")
    with_start = time.perf_counter() - t0
    match = REPLAY_DONE.search(out)
    if match is None or bench.dbsize() != 0:
        raise RuntimeError(f"replay did not delete every key: {out}")
    return Replay(
        events=int(match.group(1)),
        keys=int(match.group(2)),
        ours_s=float(match.group(3)),
        with_start_s=with_start,
        floor_s=floor,
    )


def replay_rows(mode: str, r: Replay) -> list[Row]:
    label = (
        f"[{mode}] replay of a 15-minute window: {r.events // 1000}k changes / "
        f"{r.keys // 1000}k keys"
    )
    return [
        Row(
            label,
            f"{r.ours_s:.3f} s",
            f"{r.floor_s:.3f} s",
            fmt_ratio(r.ours_s / r.floor_s),
            "≤ 2x floor",
            r.ours_s <= 2 * r.floor_s,
        ),
        Row(f"[{mode}] replay: incl. process start", f"{r.with_start_s:.3f} s", "", "", "", None),
    ]
