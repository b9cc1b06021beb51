"""Phase 3, write overhead: single-row UPDATE throughput with pgbench (2 clients, 2
threads; 8 clients in a set of rounds of its own) on an unwatched table (the floor), on
a watched table with the listener running, and on the watched table with no listener,
in interleaved rounds (each round runs the three in another order: a drift of the
machine during the phase hits each alike). The listener runs with default settings and
is started before, and stopped after, each round's run that has it; it catches up on
what the run without it captured before its own run starts. Reported: each variant's
runs (min, median, max), the ratio of the medians (the target) and the range of the
per-round ratios; and the listener's CPU per change (its process and its backends).

Trigger mode also measures the same rounds with CPU-bound writers: pgbench's sessions
set `synchronous_commit = off` (PGOPTIONS in its environment), so that a commit does not
wait for its WAL flush and the writers are bound by CPU, which the listener and its
backend share with them. Only those sessions: the server stays durable for every other
phase.

Both modes also measure the same rounds with MANY_WRITERS clients (durable): there,
commits that each sent a NOTIFY share no WAL flush (PostgreSQL serializes them), which
two clients barely show. No target: the issue's are for two clients; shown to be seen."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc_invalidator.settings import Settings
from harness import SLOT, W_PLAIN, W_WATCHED, WRITE_ROWS, Bench, Listener, Sizes, Target
from procs import proc_cpu_s, wait_for, wait_idle
from report import Row

# The write throughput target per capture mode, as a ratio to the unwatched table's, and
# the listener's CPU per change under that load, its process and its backends (issue 14).
WRITE_TARGETS = {"trigger": 0.85, "logical": 0.95}
CPU_BOUND_TARGET = 0.70  # trigger mode, the writers' sessions with synchronous_commit off
CPU_PER_CHANGE_TARGET_US = 30.0

# pgbench sessions that do not wait for their commit's WAL flush: CPU-bound writers.
CPU_BOUND_OPTIONS = "-c synchronous_commit=off"
WRITERS = 2  # pgbench's clients, on 2 threads
MANY_WRITERS = 8  # the third set of rounds: commits that could share a WAL flush


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


def pgbench(  # noqa: PLR0913 - pgbench's run: the table, its length, where, what; how keyword-only
    bench: Bench,
    table: str,
    seconds: int,
    dbname: str,
    column: str = "n",
    *,
    options: str | None = None,
    rate: int | None = None,
    clients: int = WRITERS,
) -> tuple[float, int]:
    """Single-row UPDATEs of `column` by id, `clients` on 2 threads: (tps, transactions).
    `options`: server settings for pgbench's sessions (libpq's PGOPTIONS); `rate`: that
    many transactions per second at most (pgbench -R), else as fast as they go."""
    env = dict(os.environ)
    if options:
        env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {options}".strip()
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
            *("-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds)),
            *(("-R", str(rate)) if rate else ()),
            *("-f", str(script), dbname),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 120,
        env=env,
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


def measure_writes(
    bench: Bench, sizes: Sizes, target: Target, *, cpu_bound: bool = False, clients: int = WRITERS
) -> Writes:
    """The interleaved rounds; `cpu_bound`: pgbench's sessions with synchronous_commit off;
    `clients`: pgbench's."""
    options = CPU_BOUND_OPTIONS if cpu_bound else None
    label = f"{target.mode}-writes{'-cpu-bound' if cpu_bound else ''}"
    label += f"-{clients}-writers" if clients != WRITERS else ""
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
                    listener = Listener(bench, f"{label}-{n}", target)
                    listener.wait_started()
                    catch_up(bench, target, listener)
                    backends = listener_backends(bench, target)
                    with_backends = with_backends or bool(backends)
                    cpu0 = listener.cpu_s()
                    backend0 = sum(proc_cpu_s(pid) for pid in backends)
                    tps, count = pgbench(
                        bench, W_WATCHED, sizes.write_s, dbname, options=options, clients=clients
                    )
                    events += count
                    wait_idle(listener.pid)  # let it finish the backlog: its CPU counts too
                    cpu += listener.cpu_s() - cpu0
                    backend_cpu += sum(proc_cpu_s(pid) for pid in backends) - backend0
                    listener.stop()
                    listener = None
                else:
                    table = W_PLAIN if variant == PLAIN else W_WATCHED
                    tps = pgbench(
                        bench, table, sizes.write_s, dbname, options=options, clients=clients
                    )[0]
                runs[variant].append(tps)
            print(
                f"  [{target.mode}] UPDATE tps{', CPU-bound writers' if cpu_bound else ''}"
                f"{f', {clients} writers' if clients != WRITERS else ''}, "
                f"round {n + 1}: " + ", ".join(f"{v} {runs[v][-1]:.0f}" for v in VARIANTS),
                flush=True,
            )
        # What the last run without a listener captured, taken before the next phase.
        listener = Listener(bench, f"{label}-catch-up", target)
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
    logical mode, the slot confirmed past a change of ours committed last; trigger mode,
    the listener idle.

    Logical mode: past that change's commit, not the current WAL position. Progress that
    is only a keepalive's (WAL of other tables, the listener's own history) is confirmed
    in 1 MB steps (CHASE_BYTES), so the slot may stay up to that far behind the current
    position for good: the full run waited there for 300 s, then failed."""
    if not target.logical:
        wait_idle(listener.pid)
        return
    with target.admin.transaction():
        target.admin.execute(
            sql.SQL("UPDATE {} SET n = n + 1 WHERE id = 1").format(sql.Identifier(W_WATCHED))
        )
        # (before the commit record: the listener confirms past it once it has the change)
        end = target.admin.execute("SELECT pg_current_wal_insert_lsn()").fetchone()

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


def writes_rows(
    mode: str, writes: Writes, *, cpu_bound: bool = False, clients: int = WRITERS
) -> list[Row]:
    """The write overhead's rows (without the mode prefix): medians, the ratio of the
    medians against the target, and the rounds' spread; the listener's CPU per change,
    its process and its backends, judged on their sum. `cpu_bound`: the rows of the
    CPU-bound writers' rounds (their own names and write target); `clients` other than
    WRITERS: the rows of those rounds, their own names and no target."""
    many = clients != WRITERS
    write_target = None if many else CPU_BOUND_TARGET if cpu_bound else WRITE_TARGETS[mode]
    tps = "UPDATE tps, CPU-bound writers (synchronous_commit off)" if cpu_bound else "UPDATE tps"
    tps += f", {clients} writers" if many else ""
    cpu_name = (
        "listener CPU per change, CPU-bound writers (process + its backends)"
        if cpu_bound
        else f"listener CPU per change, {clients} writers (process + its backends)"
        if many
        else "listener CPU per change (process + its backends)"
    )
    judged = not cpu_bound and not many  # the CPU target is the two durable writers'
    rounds = len(writes.plain_runs)
    ratio = writes.watched_tps / writes.plain_tps
    per_round = [w / p for w, p in zip(writes.watched_runs, writes.plain_runs, strict=True)]
    bare = [w / p for w, p in zip(writes.no_listener_runs, writes.plain_runs, strict=True)]
    if writes.backend_us_per_event is None:  # not found: the sum is not known
        cpu = f"{writes.listener_us_per_event:.0f} µs (backends not found)"
        cpu_passed = None
    else:
        cpu = f"{writes.listener_us_per_event:.0f} µs + {writes.backend_us_per_event:.0f} µs"
        total = writes.listener_us_per_event + writes.backend_us_per_event
        cpu_passed = total <= CPU_PER_CHANGE_TARGET_US
    return [
        Row(
            f"{tps}: watched + listener vs unwatched (medians of {rounds} rounds)",
            f"{writes.watched_tps:,.0f} tps",
            f"{writes.plain_tps:,.0f} tps",
            f"{ratio:.2f}",
            "" if write_target is None else f"≥ {write_target:.2f}",
            None if write_target is None else ratio >= write_target,
        ),
        Row(
            f"{tps}: watched + listener, per-round ratio min-max",
            "",
            "",
            f"{min(per_round):.2f}-{max(per_round):.2f}",
            "",
            None,
        ),
        Row(
            f"{tps}: watched, no listener vs unwatched (medians)",
            f"{writes.no_listener_tps:,.0f} tps",
            f"{writes.plain_tps:,.0f} tps",
            f"{writes.no_listener_tps / writes.plain_tps:.2f} ({min(bare):.2f}-{max(bare):.2f})",
            "",
            None,
        ),
        Row(
            f"{tps} min / median / max: watched + listener; unwatched",
            spread(writes.watched_runs),
            spread(writes.plain_runs),
            "",
            "",
            None,
        ),
        Row(
            f"{tps} min / median / max: watched, no listener",
            spread(writes.no_listener_runs),
            "",
            "",
            "",
            None,
        ),
        Row(
            cpu_name,
            cpu,
            "",
            "",
            f"≤ {CPU_PER_CHANGE_TARGET_US:g} µs (sum)" if judged else "",
            cpu_passed if judged else None,
        ),
    ]
