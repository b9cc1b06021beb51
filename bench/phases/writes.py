"""Phase 3, write overhead: single-row UPDATE throughput with pgbench (2 clients, 2
threads) on an unwatched table (the floor), on a watched table with the listener running,
and on the watched table with no listener, in interleaved rounds (each round runs the
three in another order: a drift of the machine during the phase hits each alike). The
listener runs with default settings and is started before, and stopped after, each
round's run that has it; it catches up on what the run without it captured before its
own run starts. Reported: each variant's runs (min, median, max), the ratio of the
medians (the target) and the range of the per-round ratios; and the listener's CPU per
change (its process and its backends)."""

from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import dataclass

import psycopg

from cdc_invalidator.settings import Settings
from harness import SLOT, W_PLAIN, W_WATCHED, WRITE_ROWS, Bench, Listener, Sizes, Target
from procs import proc_cpu_s, wait_for, wait_idle
from report import Row

# The write throughput target per capture mode, as a ratio to the unwatched table's.
WRITE_TARGETS = {"trigger": 0.70, "logical": 0.85}


@dataclass
class Writes:
    plain_runs: list[float]  # unwatched table, tps of each round
    watched_runs: list[float]  # watched table, listener running
    no_listener_runs: list[float]  # watched table, no listener
    listener_cpu_pct: float  # of one core, during the watched runs
    listener_us_per_event: float  # listener process CPU per committed change
    backend_us_per_event: float | None  # the listener's PostgreSQL backends, likewise

    @property
    def plain_tps(self) -> float:
        return statistics.median(self.plain_runs)

    @property
    def watched_tps(self) -> float:
        return statistics.median(self.watched_runs)

    @property
    def no_listener_tps(self) -> float:
        return statistics.median(self.no_listener_runs)


def pgbench(
    bench: Bench, table: str, seconds: int, dbname: str, column: str = "n"
) -> tuple[float, int]:
    """Single-row UPDATEs of `column` by id, 2 clients on 2 threads: (tps, transactions)."""
    script = bench.workdir / f"update-{table}-{column}.sql"
    script.write_text(
        f"\\set id random(1, {WRITE_ROWS})\n"
        f"UPDATE {table} SET {column} = {column} + 1 WHERE id = :id;\n"
    )
    bench.admin.execute("CHECKPOINT")
    result = subprocess.run(
        [
            str(bench.pg.bindir / "pgbench"),
            *("-h", "127.0.0.1", "-p", str(bench.pg.port), "-U", "postgres"),
            *("-n", "-M", "prepared", "-c", "2", "-j", "2", "-T", str(seconds)),
            *("-f", str(script), dbname),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 120,
    )
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    count = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    if result.returncode != 0 or not tps or not count:
        raise RuntimeError(f"pgbench failed: {result.stdout}\n{result.stderr}")
    return float(tps.group(1)), int(count.group(1))


def listener_backends(bench: Bench, target: Target) -> list[int]:
    """The pids of the listener's PostgreSQL backends (by application_name): one in
    trigger mode; the walsender, which decodes, and a bookkeeping session in logical."""
    name = Settings.model_fields["application_name"].default
    rows = bench.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
        [name, psycopg.conninfo.conninfo_to_dict(target.dsn)["dbname"]],
    )
    return [int(row[0]) for row in rows]


PLAIN, WATCHED, NO_LISTENER = "unwatched", "watched + listener", "watched, no listener"
VARIANTS = (PLAIN, WATCHED, NO_LISTENER)


def measure_writes(bench: Bench, sizes: Sizes, target: Target) -> Writes:
    runs: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    dbname = str(psycopg.conninfo.conninfo_to_dict(target.dsn)["dbname"])
    listener: Listener | None = None
    cpu = backend_cpu = 0.0
    events = 0
    with_backends = False
    try:
        for n in range(sizes.write_rounds):
            for variant in VARIANTS[n % 3 :] + VARIANTS[: n % 3]:
                if variant == WATCHED:
                    listener = Listener(bench, f"{target.mode}-writes-{n}", target)
                    listener.wait_started()
                    catch_up(bench, target, listener)
                    backends = listener_backends(bench, target)
                    with_backends = with_backends or bool(backends)
                    cpu0 = listener.cpu_s()
                    backend0 = sum(proc_cpu_s(pid) for pid in backends)
                    tps, count = pgbench(bench, W_WATCHED, sizes.write_s, dbname)
                    events += count
                    wait_idle(listener.pid)  # let it finish the backlog: its CPU counts too
                    cpu += listener.cpu_s() - cpu0
                    backend_cpu += sum(proc_cpu_s(pid) for pid in backends) - backend0
                    listener.stop()
                    listener = None
                else:
                    table = W_PLAIN if variant == PLAIN else W_WATCHED
                    tps = pgbench(bench, table, sizes.write_s, dbname)[0]
                runs[variant].append(tps)
            print(
                f"  [{target.mode}] UPDATE tps, round {n + 1}: "
                + ", ".join(f"{v} {runs[v][-1]:.0f}" for v in VARIANTS),
                flush=True,
            )
        # What the last run without a listener captured, taken before the next phase.
        listener = Listener(bench, f"{target.mode}-writes-catch-up", target)
        listener.wait_started()
        catch_up(bench, target, listener)
    finally:
        if listener is not None:
            listener.stop()
    if not target.logical:
        bench.admin.execute("TRUNCATE cdc_invalidator.queue_v1")
    return Writes(
        plain_runs=runs[PLAIN],
        watched_runs=runs[WATCHED],
        no_listener_runs=runs[NO_LISTENER],
        listener_cpu_pct=100 * cpu / (sizes.write_s * sizes.write_rounds),
        listener_us_per_event=1e6 * cpu / max(events, 1),
        backend_us_per_event=1e6 * backend_cpu / max(events, 1) if with_backends else None,
    )


def catch_up(bench: Bench, target: Target, listener: Listener) -> None:
    """Until the listener took what was captured while none ran (outside any timing):
    logical mode, the slot confirmed up to the current WAL position; trigger mode, the
    listener idle."""
    if not target.logical:
        wait_idle(listener.pid)
        return
    end = target.admin.execute("SELECT pg_current_wal_lsn()").fetchone()

    def caught_up() -> bool:
        listener.check()
        row = target.admin.execute(
            "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots WHERE slot_name = %s",
            [end[0] if end else None, SLOT],
        ).fetchone()
        return bool(row and row[0])

    wait_for(caught_up, 300, "the slot caught up", 0.05)


def spread(runs: list[float]) -> str:
    return f"{min(runs):,.0f} / {statistics.median(runs):,.0f} / {max(runs):,.0f}"


def writes_rows(mode: str, writes: Writes) -> list[Row]:
    """The write overhead's rows (without the mode prefix): medians, the ratio of the
    medians against the target, and the rounds' spread."""
    write_target = WRITE_TARGETS[mode]
    rounds = len(writes.plain_runs)
    ratio = writes.watched_tps / writes.plain_tps
    per_round = [w / p for w, p in zip(writes.watched_runs, writes.plain_runs, strict=True)]
    bare = [w / p for w, p in zip(writes.no_listener_runs, writes.plain_runs, strict=True)]
    backend = (
        "" if writes.backend_us_per_event is None else f" + {writes.backend_us_per_event:.0f} µs"
    )
    return [
        Row(
            f"UPDATE tps: watched + listener vs unwatched (medians of {rounds} rounds)",
            f"{writes.watched_tps:,.0f} tps",
            f"{writes.plain_tps:,.0f} tps",
            f"{ratio:.2f}",
            f"≥ {write_target:.2f}",
            ratio >= write_target,
        ),
        Row(
            "UPDATE tps: watched + listener, per-round ratio min-max",
            "",
            "",
            f"{min(per_round):.2f}-{max(per_round):.2f}",
            "",
            None,
        ),
        Row(
            "UPDATE tps: watched, no listener vs unwatched (medians)",
            f"{writes.no_listener_tps:,.0f} tps",
            f"{writes.plain_tps:,.0f} tps",
            f"{writes.no_listener_tps / writes.plain_tps:.2f} ({min(bare):.2f}-{max(bare):.2f})",
            "",
            None,
        ),
        Row(
            "UPDATE tps min / median / max: watched + listener; unwatched",
            spread(writes.watched_runs),
            spread(writes.plain_runs),
            "",
            "",
            None,
        ),
        Row(
            "UPDATE tps min / median / max: watched, no listener",
            spread(writes.no_listener_runs),
            "",
            "",
            "",
            None,
        ),
        Row(
            "listener CPU per change (process + its backends)",
            f"{writes.listener_us_per_event:.0f} µs{backend}",
            "",
            "",
            "",
            None,
        ),
    ]
