"""Phase 3, write overhead: single-row UPDATE throughput with pgbench (2 clients, 2
threads) on a watched table with the listener running, against the same on an unwatched
table, in interleaved rounds; and the listener's CPU per change (its process and
backend)."""

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
    plain_tps: float
    watched_tps: float
    watched_no_listener_tps: float
    plain_runs: list[float]
    watched_runs: list[float]
    listener_cpu_pct: float  # of one core, during the watched runs
    listener_us_per_event: float  # listener process CPU per committed change
    backend_us_per_event: float | None  # the listener's PostgreSQL backend, likewise


def pgbench(bench: Bench, table: str, seconds: int, dbname: str) -> tuple[float, int]:
    """Single-row UPDATEs by id, 2 clients on 2 threads: (tps, transactions)."""
    script = bench.workdir / f"update-{table}.sql"
    script.write_text(
        f"\\set id random(1, {WRITE_ROWS})\nUPDATE {table} SET n = n + 1 WHERE id = :id;\n"
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


def measure_writes(bench: Bench, sizes: Sizes, target: Target) -> Writes:
    plain: list[float] = []
    watched: list[float] = []
    dbname = str(psycopg.conninfo.conninfo_to_dict(target.dsn)["dbname"])
    listener = Listener(bench, f"{target.mode}-writes", target)
    try:
        listener.wait_started()
        wait_idle(listener.pid)
        backends = listener_backends(bench, target)

        def backends_cpu() -> float:
            return sum(proc_cpu_s(pid) for pid in backends)

        cpu = backend_cpu = 0.0
        events = 0
        for _ in range(sizes.write_rounds):
            plain.append(pgbench(bench, W_PLAIN, sizes.write_s, dbname)[0])
            cpu0 = listener.cpu_s()
            backend0 = backends_cpu()
            tps, count = pgbench(bench, W_WATCHED, sizes.write_s, dbname)
            watched.append(tps)
            events += count
            wait_idle(listener.pid)  # let it finish the backlog: its CPU counts too
            cpu += listener.cpu_s() - cpu0
            backend_cpu += backends_cpu() - backend0
            print(
                f"  [{target.mode}] UPDATE tps: unwatched {plain[-1]:.0f}, "
                f"watched {watched[-1]:.0f}",
                flush=True,
            )
    finally:
        listener.stop()
    # For reference: capture's own cost in the writers, with no listener competing for
    # the CPU (logical: nothing decodes then; the slot keeps the WAL).
    no_listener = pgbench(bench, W_WATCHED, sizes.write_s, dbname)[0]
    print(f"  [{target.mode}] UPDATE tps: watched, no listener {no_listener:.0f}", flush=True)
    if not target.logical:
        bench.admin.execute("TRUNCATE cdc_invalidator.queue_v1")
    return Writes(
        plain_tps=statistics.median(plain),
        watched_tps=statistics.median(watched),
        watched_no_listener_tps=no_listener,
        plain_runs=plain,
        watched_runs=watched,
        listener_cpu_pct=100 * cpu / (sizes.write_s * sizes.write_rounds),
        listener_us_per_event=1e6 * cpu / max(events, 1),
        backend_us_per_event=1e6 * backend_cpu / max(events, 1) if backends else None,
    )


def catch_up(bench: Bench, target: Target) -> None:
    """Let a listener take what the slot kept while none ran (outside any timing)."""
    end = target.admin.execute("SELECT pg_current_wal_lsn()").fetchone()
    listener = Listener(bench, f"{target.mode}-catch-up", target)
    try:

        def caught_up() -> bool:
            listener.check()
            row = target.admin.execute(
                "SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots WHERE slot_name = %s",
                [end[0] if end else None, SLOT],
            ).fetchone()
            return bool(row and row[0])

        wait_for(caught_up, 300, "the slot caught up", 0.05)
    finally:
        listener.stop()


def writes_rows(mode: str, writes: Writes) -> list[Row]:
    """The write overhead's rows (without the mode prefix)."""
    write_target = WRITE_TARGETS[mode]
    ratio = writes.watched_tps / writes.plain_tps
    backend = (
        "" if writes.backend_us_per_event is None else f" + {writes.backend_us_per_event:.0f} µs"
    )
    return [
        Row(
            "UPDATE tps: watched + listener vs unwatched",
            f"{writes.watched_tps:,.0f} tps",
            f"{writes.plain_tps:,.0f} tps",
            f"{ratio:.2f}",
            f"≥ {write_target:.2f}",
            ratio >= write_target,
        ),
        Row(
            "UPDATE tps: watched, no listener vs unwatched",
            f"{writes.watched_no_listener_tps:,.0f} tps",
            f"{writes.plain_tps:,.0f} tps",
            f"{writes.watched_no_listener_tps / writes.plain_tps:.2f}",
            "",
            None,
        ),
        Row(
            "listener CPU per change (process + its backend)",
            f"{writes.listener_us_per_event:.0f} µs{backend}",
            "",
            "",
            "",
            None,
        ),
    ]
