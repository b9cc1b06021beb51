"""cdc-invalidator benchmark: the listener against floors measured in the same run.

`make bench` (or `.venv/bin/python bench/run.py [--quick] [--big]`) starts its own
PostgreSQL and Redis (tests/support/servers.py, PostgreSQL with its default durable
settings: fsync and synchronous_commit on) and measures:

1. commit -> key-deleted latency at ~300 single-row UPDATE commits per second, for
   (a) the floor: a row trigger sends the keys in a pg_notify payload to a minimal
   psycopg 3 listener that UNLINKs them (bench/floor_listener.py), and (b) the real
   listener, `python -m cdc_invalidator run` with default settings. Both run side by
   side and the commits alternate between their tables in half-second blocks, so that
   both see the same machine. "Deleted" is the same clock for both: a separate process
   (bench/keywatch.py) receives Redis keyspace notifications (`del`) and timestamps
   them with CLOCK_MONOTONIC; the commit time is taken in the writer just after COMMIT
   returned. A sample's latency is the time until both of its row's keys were gone.
2. backlog drain: N row changes (2N keys) queued while the listener was stopped, then
   the listener started and timed until every key is gone (and, reported apart, until
   the queue table is empty: a design may delete processed rows later). Floor: one
   Python process SELECTs the key columns of those rows and UNLINKs the keys in a hiredis
   pipeline, one UNLINK per row of its two keys (DESIGN.md's floor is one per key; a
   batched variant is reported too).
   Peak RSS of the listener (VmHWM). `--big` adds a 1M-change backlog. `--cluster`
   drains the same backlog into a Redis Cluster of 3 masters too (the listener given one
   node's URL), against a floor on that cluster: the same SELECT, then one hiredis
   pipeline per node of one UNLINK per key (batched: one UNLINK per hash slot).
3. write overhead: single-row UPDATE throughput with pgbench (2 clients, 2 threads) on a
   watched table with the listener running, against the same on an unwatched table,
   in interleaved rounds; and the listener's CPU per change (its process and backend).
4. replay: N changes invalidated by the listener with history kept (replay_history =
   1h), the keys set again (a restored snapshot), then `cdc-invalidator replay --since
   15m` timed (its own figure, and with process start). Floor: a hiredis pipeline of
   one UNLINK per key over the same keys, known up front.

Phases 1-3 run the listener with replay_history = "0s" (processed queue rows pruned at
once, as before replay existed); everything else is at its default.

Other processes' CPU during each phase is reported (this machine may be shared). Prints
a markdown table (metric | ours | floor | ratio | target | pass) with the machine
described, and writes it to bench/results/latest.md and latest.json. Exit status 0 even
when a target is missed: this is a report, and misses are marked FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, TextIO

# Run as a script (bench/run.py): the repository's root on the path before the imports
# below, for the test rig's throwaway servers (tests/support, not part of the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
import redis
from psycopg import sql
from redis.crc import key_slot
from tests.support.servers import PostgresServer, RedisClusterServer, RedisServer

from cdc_invalidator.settings import Settings

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
KEYWATCH = BENCH_DIR / "keywatch.py"
FLOOR_LISTENER = BENCH_DIR / "floor_listener.py"
CONTROL_CHANNEL = "cdc-bench:control"  # keywatch.py listens for "dump" here
FLOOR_CHANNEL = "cdc_bench_floor"

TEMPLATES = ["user:{id}", "user:email:{email}"]
# Tables: users(id, email, n); every benchmark UPDATE bumps n, keys use id and email.
LAT_FLOOR = "lat_floor_users"  # raw NOTIFY trigger, no cdc_invalidator
LAT_OURS = "lat_users"
DRAIN = "drain_users"
BIG = "big_users"
W_WATCHED = "w_watched"
W_PLAIN = "w_plain"
WATCHED = [LAT_OURS, DRAIN, BIG, W_WATCHED]
MODES = ("trigger", "logical")
# Logical capture runs on its own database of the same server (its install removes
# triggers, and its publication must not cover the trigger mode's tables), with the
# same tables.
LOGICAL_DB = "logical"
SLOT = "cdc_bench"
WRITE_ROWS = 100_000
NOISY_PCT = 10  # other processes' CPU (% of one core) above which a phase is marked noisy

PG_SETTINGS_SHOWN = [
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_wal_size",
]


@dataclass(frozen=True)
class Sizes:
    rate: int
    latency_s: float
    warmup: int
    drain_rows: int
    drain_repeats: int
    big_rows: int | None
    write_s: int
    write_rounds: int


@dataclass
class Target:
    """One capture mode under test: its database, an admin connection, its config."""

    mode: str
    dsn: str
    admin: psycopg.Connection[Any]
    config: Path

    @property
    def logical(self) -> bool:
        return self.mode == "logical"


@dataclass
class Row:
    """One line of the results table. passed None: reported, no target."""

    metric: str
    ours: str
    floor: str
    ratio: str
    target: str
    passed: bool | None


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    foreign_cpu_pct: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def user_keys(i: int) -> tuple[str, str]:
    return f"user:{i}", f"user:email:u{i}@example.com"


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def proc_status_kb(pid: int, field_name: str) -> int:
    """A `kB` line of /proc/<pid>/status (VmHWM: peak resident set size)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _all_procs() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds incl. reaped children) for every process we may read."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
        out[int(entry)] = (int(fields[1]), cpu)
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user + nice + system: what processes are charged with (irq, softirq and steal are
    # charged to no process, so they would count as someone else's).
    return sum(values[:3]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """How much CPU did processes that are not ours use during a phase?

    Ours: this process, its descendants (Redis, listeners, pgbench, helpers) and the
    PostgreSQL cluster (the postmaster and its backends). Reaped children count in their
    parent's totals. Everything else busy on the machine is someone else's load, which
    makes a run noisy: reported per phase.
    """

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.foreign_pct: dict[str, float] = {}

    def _ours_s(self) -> float:
        procs = _all_procs()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        total, todo, seen = 0.0, [r for r in self.roots if r in procs], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += procs[pid][1]
            todo += children.get(pid, [])
        return total

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        busy0, ours0, t0 = machine_busy_s(), self._ours_s(), time.monotonic()
        yield
        busy1, ours1, t1 = machine_busy_s(), self._ours_s(), time.monotonic()
        foreign = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        self.foreign_pct[name] = 100 * foreign / max(t1 - t0, 1e-9)


def wait_idle(pid: int, timeout_s: float = 30.0) -> None:
    """Until a process stops using CPU (two 0.2 s windows with at most one tick each)."""
    deadline = time.monotonic() + timeout_s
    quiet, last = 0, proc_cpu_s(pid)
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = proc_cpu_s(pid)
        quiet = quiet + 1 if now - last <= 0.011 else 0
        last = now


def read_ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{what} did not start: {line!r}")


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 30.0) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.002) -> float:
    """Poll until predicate() is true; return time.monotonic() at that moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def fmt_ms(value: float) -> str:
    return f"{value:.3f} ms"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


# ------------------------------------------------------------------- the environment


class Bench:
    """The servers, an admin connection and the listener's config file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pg = PostgresServer.create()  # default durable settings: fsync on
        self.rs = RedisServer.create()
        self.pg.start()
        self.rs.start()
        self.dsn = self.pg.dsn()
        self.admin = psycopg.connect(self.dsn, autocommit=True)
        self.redis = redis.Redis(host="127.0.0.1", port=self.rs.port, socket_timeout=60)
        self.children: list[subprocess.Popen[Any]] = []
        self.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(LOGICAL_DB)))
        ldsn = self.pg.dsn(LOGICAL_DB)
        self.targets = {
            "trigger": Target("trigger", self.dsn, self.admin, workdir / "trigger.toml"),
            "logical": Target(
                "logical",
                ldsn,
                psycopg.connect(ldsn, autocommit=True),
                workdir / "logical.toml",
            ),
        }

    def close(self) -> None:
        for child in self.children:
            with contextlib.suppress(Exception):
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
        for target in self.targets.values():
            with contextlib.suppress(Exception):
                target.admin.close()
        with contextlib.suppress(Exception):
            self.redis.close()
        self.rs.destroy()
        self.pg.destroy()

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(cmd, **kwargs)
        self.children.append(proc)
        return proc

    def execute(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        cur = self.admin.execute(query.encode(), params)  # bench SQL, not user input
        return cur.fetchall() if cur.description else []

    def create_table(self, name: str, ids: range, admin: psycopg.Connection[Any]) -> None:
        """users-like table; loaded with triggers disabled (no events for the load) and
        before the slot exists (no WAL to decode for it)."""
        ident = sql.Identifier(name)
        admin.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY, email text NOT NULL, "
                "n int NOT NULL DEFAULT 0)"
            ).format(ident)
        )
        with admin.transaction():
            admin.execute("SET LOCAL session_replication_role = replica")
            admin.execute(
                sql.SQL(
                    "INSERT INTO {} (id, email) "
                    "SELECT g, 'u' || g || '@example.com' FROM generate_series(%s::int, %s::int) g"
                ).format(ident),
                (ids.start, ids.stop - 1),
            )
        admin.execute(sql.SQL("VACUUM ANALYZE {}").format(ident))

    def write_config(
        self, target: Target, replay_history: str = "0s", redis_url: str | None = None
    ) -> None:
        # History for replay is kept only in the replay phase: the other phases measure
        # the queue's pruning as they always did (keeping rows costs the writers nothing).
        lines = [
            f"database_url = {json.dumps(target.dsn)}",
            f"redis_url = {json.dumps(redis_url or self.rs.url)}",
            f"replay_history = {json.dumps(replay_history)}",
        ]
        if target.logical:
            lines += ['capture = "logical"', f"slot_name = {json.dumps(SLOT)}"]
        for table in WATCHED:
            lines.append(f'[tables."public.{table}"]')
            lines.append(f"keys = {json.dumps(TEMPLATES)}")
        target.config.write_text("\n".join(lines) + "\n")

    def cli(self, target: Target, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "cdc_invalidator", *args, "--config", str(target.config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cdc-invalidator {args[0]} failed: {result.stderr}")
        return result.stdout

    def set_keys(self, ids: range) -> None:
        pipe = self.redis.pipeline(transaction=False)
        chunk: dict[str, str] = {}
        for i in ids:
            k1, k2 = user_keys(i)
            chunk[k1] = chunk[k2] = "cached"
            if len(chunk) >= 2000:
                pipe.mset(chunk)
                chunk = {}
                if len(pipe) >= 50:
                    pipe.execute()
        if chunk:
            pipe.mset(chunk)
        pipe.execute()

    def dbsize(self) -> int:
        return int(self.redis.dbsize())

    def queue_total(self) -> int:
        return int(self.execute("SELECT count(*) FROM cdc_invalidator.queue_v1")[0][0])

    def queue_empty(self) -> bool:
        return bool(self.execute("SELECT NOT EXISTS (SELECT FROM cdc_invalidator.queue_v1)")[0][0])

    def queue_len(self, table: str) -> int:
        """Rows of `table` in our queue table (processed or not: a design may keep some)."""
        query = "SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE table_name = %s"
        return int(self.execute(query, [table])[0][0])

    def keyspace_events(self, on: bool) -> None:
        self.redis.config_set("notify-keyspace-events", "Kg" if on else "")

    def quiesce(self, target: Target, *tables: str) -> None:
        """Housekeeping before a timed run, outside the timing: vacuum and checkpoint."""
        for table in tables:
            target.admin.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.SQL(table)))
        self.admin.execute("CHECKPOINT")


class Listener:
    """`python -m cdc_invalidator run --config ...`: the product, default settings."""

    def __init__(self, bench: Bench, name: str, target: Target) -> None:
        self.bench = bench
        self.log_path = bench.workdir / f"listener-{name}.log"
        self._log: TextIO = self.log_path.open("w")
        self.popen_at = time.monotonic()
        self._next_log_check = 0.0
        self.proc = bench.spawn(
            [sys.executable, "-m", "cdc_invalidator", "run", "--config", str(target.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> Iterator[dict[str, Any]]:
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                yield json.loads(raw)

    def started_at(self) -> float | None:
        """time.monotonic() of the `listener_started` log line, from its timestamp."""
        for event in self.events():
            if event.get("event") == "listener_started":
                wall = datetime.fromisoformat(str(event["timestamp"])).timestamp()
                return wall - (time.time() - time.monotonic())
        return None

    def check(self) -> None:
        """Raise if the listener exited or logged an error (the log is read once a second)."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"listener exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        if time.monotonic() < self._next_log_check:
            return
        self._next_log_check = time.monotonic() + 1.0
        for event in self.events():
            if event.get("level") in ("error", "critical"):
                raise RuntimeError(f"listener logged an error: {event}")

    def wait_started(self) -> None:
        def started() -> bool:
            self.check()
            return self.started_at() is not None

        wait_for(started, 30, "listener_started", interval_s=0.01)

    def peak_rss_mb(self) -> float:
        return proc_status_kb(self.pid, "VmHWM") / 1024

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def stop(self) -> None:
        code = stop_process(self.proc)
        self._log.close()
        if code not in (0, None):
            raise RuntimeError(f"listener exited {code}: {self.log_path.read_text()[-2000:]}")
        for event in self.events():
            if event.get("level") in ("warning", "error"):
                print(f"  listener logged: {event}", file=sys.stderr)


# ------------------------------------------------------------------------ 1. latency


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
    bench.keyspace_events(True)
    watch = bench.spawn(
        [sys.executable, str(KEYWATCH), str(bench.rs.port), "user:*"],
        stdout=subprocess.PIPE,
        text=True,
    )
    floor_ids, our_ids = latency_ids(sizes)
    floor_changes = [(LAT_FLOOR, i) for i in floor_ids]
    our_changes = [(LAT_OURS, i) for i in our_ids]
    block = max(1, sizes.rate // 2)
    w = sizes.warmup
    dsns = {LAT_FLOOR: bench.dsn, LAT_OURS: target.dsn}
    try:
        read_ready(watch, "keywatch")
        warmup = alternate(floor_changes[:w], our_changes[:w], block)
        paced_updates(bench, warmup, sizes.rate, None, dsns)
        wait_for(lambda: bench.dbsize() == 0, 10, "warm-up keys deleted")
        commits: dict[int, int] = {}
        cpu0 = (proc_cpu_s(floor_proc.pid), listener.cpu_s())
        schedule = alternate(floor_changes[w:], our_changes[w:], block)
        paced_updates(bench, schedule, sizes.rate, commits, dsns)

        # Every key should be gone within milliseconds; a missing one counts as lost.
        def all_gone() -> bool:
            check()
            return bench.dbsize() == 0

        with contextlib.suppress(TimeoutError):
            wait_for(all_gone, 10, "keys deleted", interval_s=0.01)
        cpu1 = (proc_cpu_s(floor_proc.pid), listener.cpu_s())
        bench.redis.publish(CONTROL_CHANNEL, "dump")
        assert watch.stdout is not None
        deleted: dict[str, int] = json.loads(watch.stdout.readline())
        watch.wait(10)
    finally:
        stop_process(watch)
        bench.keyspace_events(False)
    return (
        _latency(commits, deleted, floor_ids[w:], cpu1[0] - cpu0[0]),
        _latency(commits, deleted, our_ids[w:], cpu1[1] - cpu0[1]),
    )


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


def start_floor_listener(bench: Bench) -> subprocess.Popen[Any]:
    """The floor: a row trigger with the keys in the pg_notify payload, and its loop."""
    bench.admin.execute(
        sql.SQL(
            """
            CREATE OR REPLACE FUNCTION bench_floor_notify() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify({}, 'user:' || NEW.id || ' user:email:' || NEW.email);
                RETURN NULL;
            END $$;
            CREATE OR REPLACE TRIGGER bench_floor AFTER UPDATE ON {}
                FOR EACH ROW EXECUTE FUNCTION bench_floor_notify();
            """
        ).format(sql.Literal(FLOOR_CHANNEL), sql.Identifier(LAT_FLOOR))
    )
    proc = bench.spawn(
        [sys.executable, str(FLOOR_LISTENER), bench.dsn, str(bench.rs.port), FLOOR_CHANNEL],
        stdout=subprocess.PIPE,
        text=True,
    )
    read_ready(proc, "floor listener")
    return proc


# -------------------------------------------------------------------- 2. backlog drain


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


def drain_floor(bench: Bench, table: str, keys_per_unlink: int, dsn: str) -> float:
    """SELECT the key columns of every row + pipelined UNLINK of their keys (hiredis)."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id::text, email FROM {}").format(sql.Identifier(table))
        ).fetchall()
    client = redis.Redis(host="127.0.0.1", port=bench.rs.port, socket_timeout=60)
    pipe = client.pipeline(transaction=False)
    keys: list[str] = []
    for id_text, email in rows:
        keys.append("user:" + id_text)
        keys.append("user:email:" + email)
        if len(keys) >= keys_per_unlink:
            pipe.unlink(*keys)
            keys = []
            if len(pipe) >= max(100, 10_000 // keys_per_unlink):
                pipe.execute()
    if keys:
        pipe.unlink(*keys)
    pipe.execute()
    elapsed = time.perf_counter() - t0
    client.close()
    if bench.dbsize() != 0:
        raise RuntimeError("floor drain left keys behind")
    return elapsed


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


# ------------------------------------------------- 2b. backlog drain into a Redis Cluster


class ClusterKeys:
    """--cluster: a Redis Cluster of 3 masters; keys set, counted and deleted per node."""

    def __init__(self) -> None:
        self.server = RedisClusterServer.create()
        self.server.start()
        self.nodes = [
            redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=60)
            for node in self.server.nodes
        ]

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        for client in self.nodes:
            with contextlib.suppress(Exception):
                client.close()
        self.server.destroy()

    def owners(self) -> list[int]:
        """Slot -> index of the node that serves it (CLUSTER SLOTS)."""
        ports = {node.port: i for i, node in enumerate(self.server.nodes)}
        owner = [-1] * 16384
        table = self.nodes[0].execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        for start, end, primary, *_ in table:
            owner[start : end + 1] = [ports[int(primary[1])]] * (end - start + 1)
        return owner

    def set_keys(self, ids: range) -> None:
        owner = self.owners()
        pipes = [client.pipeline(transaction=False) for client in self.nodes]
        for i in ids:
            for key in user_keys(i):
                pipes[owner[key_slot(key.encode())]].set(key, "cached")
            if i % 5000 == 0:
                for pipe in pipes:
                    pipe.execute()
        for pipe in pipes:
            pipe.execute()

    def flushall(self) -> None:
        for client in self.nodes:
            client.flushall()

    def dbsize(self) -> int:
        return sum(int(client.dbsize()) for client in self.nodes)


def cluster_drain_floor(keys: ClusterKeys, table: str, dsn: str, per_slot: bool) -> float:
    """SELECT the key columns of every row + one hiredis pipeline per node: one UNLINK
    per key, or (per_slot) one UNLINK per hash slot. The slot table is read before."""
    owner = keys.owners()
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id::text, email FROM {}").format(sql.Identifier(table))
        ).fetchall()
    pipes = [client.pipeline(transaction=False) for client in keys.nodes]
    by_slot: dict[int, list[str]] = {}
    for n, (id_text, email) in enumerate(rows, 1):
        for key in ("user:" + id_text, "user:email:" + email):
            slot = key_slot(key.encode())
            if per_slot:
                by_slot.setdefault(slot, []).append(key)
            else:
                pipes[owner[slot]].unlink(key)
        if n % 5000 == 0 and not per_slot:
            for pipe in pipes:
                pipe.execute()
    for slot, group in by_slot.items():
        pipes[owner[slot]].unlink(*group)
    for pipe in pipes:
        pipe.execute()
    elapsed = time.perf_counter() - t0
    if keys.dbsize() != 0:
        raise RuntimeError("cluster floor drain left keys behind")
    return elapsed


def measure_cluster_drain(
    bench: Bench, keys: ClusterKeys, target: Target, *, rows: int, repeats: int
) -> Drain:
    """The drain of measure_drain(), into the cluster: the listener is given one node."""
    on_cluster = Target(
        target.mode,
        target.dsn,
        target.admin,
        target.config.with_stem(target.config.stem + "-cluster"),
    )
    bench.write_config(on_cluster, redis_url=keys.url)
    floors: list[float] = []
    batched: list[float] = []
    runs: list[DrainRun] = []
    ids = range(1, rows + 1)
    for n in range(repeats):
        keys.flushall()
        keys.set_keys(ids)
        bench.quiesce(target, DRAIN)
        floors.append(cluster_drain_floor(keys, DRAIN, target.dsn, per_slot=False))
        keys.set_keys(ids)
        batched.append(cluster_drain_floor(keys, DRAIN, target.dsn, per_slot=True))
        keys.set_keys(ids)
        if not target.logical:
            bench.admin.execute("TRUNCATE cdc_invalidator.queue_v1")
        queue_updates(bench, DRAIN, rows, target)
        if target.logical:
            bench.quiesce(target, DRAIN)
        else:
            bench.quiesce(target, "cdc_invalidator.queue_v1", DRAIN)
        run = drain_ours(
            bench, f"{target.mode}-cluster-drain-{rows}-{n}", rows, on_cluster, keys.dbsize
        )
        runs.append(run)
        print(
            f"  [{target.mode}] cluster drain {rows}: floor {floors[-1]:.3f} s "
            f"(per-slot {batched[-1]:.3f} s), ours {run.keys_gone_s:.3f} s, listener CPU "
            f"{run.cpu_s:.2f} s, peak RSS {run.peak_rss_mb:.1f} MB",
            flush=True,
        )
    return best_drain(rows, floors, batched, runs)


def cluster_rows(single: Drain, d: Drain) -> list[Row]:
    """The cluster drain's rows, beside the single-node drain's."""
    label = f"{d.rows // 1000}k changes / {2 * d.rows // 1000}k keys"
    rows = [
        Row(
            f"cluster drain {label} (3 masters)",
            f"{d.ours_s:.3f} s",
            f"{d.floor_s:.3f} s",
            fmt_ratio(d.ours_s / d.floor_s),
            "≤ 2x floor",
            d.ours_s <= 2 * d.floor_s,
        ),
        Row(
            "cluster drain: vs per-slot UNLINK floor",
            f"{d.ours_s:.3f} s",
            f"{d.batched_floor_s:.3f} s",
            fmt_ratio(d.ours_s / d.batched_floor_s),
            "",
            None,
        ),
        Row(
            "cluster drain: rate, listener CPU, peak RSS",
            f"{d.rows / d.ours_s:,.0f} changes/s, {d.listener_cpu_s:.2f} s, {d.peak_rss_mb:.1f} MB",
            "",
            "",
            "",
            None,
        ),
    ]
    rows.append(
        Row(
            "cluster drain vs the single-node drain",
            f"{d.ours_s:.3f} s",
            f"{single.ours_s:.3f} s",
            fmt_ratio(d.ours_s / single.ours_s),
            "",
            None,
        )
    )
    return rows


# ------------------------------------------------------------------- 4. replay


@dataclass
class Replay:
    events: int
    keys: int
    ours_s: float  # the replay itself, as the command reports it
    with_start_s: float  # the `replay --since 15m` command, process start included
    floor_s: float


REPLAY_DONE = re.compile(
    r"replayed (\d+) invalidations .*\((\d+) keys and patterns deleted, in ([\d.]+) s\)"
)


def unlink_floor(bench: Bench, ids: range) -> float:
    """Pipelined UNLINK of the replayed keys, one key per UNLINK (keys known up front)."""
    keys = [k for i in ids for k in user_keys(i)]
    client = redis.Redis(host="127.0.0.1", port=bench.rs.port, socket_timeout=60)
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.unlink(key)
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()
    elapsed = time.perf_counter() - t0
    client.close()
    if bench.dbsize() != 0:
        raise RuntimeError("floor unlink left keys behind")
    return elapsed


def measure_replay(bench: Bench, table: str, rows: int, target: Target) -> Replay:
    """The listener invalidates `rows` changes with history kept; Redis gets the keys
    back (a restored snapshot); `replay --since 15m` deletes them again."""
    ids = range(1, rows + 1)
    bench.write_config(target, replay_history="1h")
    try:
        bench.redis.flushall()
        bench.set_keys(ids)
        history = "history_v1" if target.logical else "queue_v1"
        target.admin.execute(f"TRUNCATE cdc_invalidator.{history}".encode())
        queue_updates(bench, table, rows, target)
        drain_ours(bench, f"{target.mode}-replay-history", rows, target)
        bench.set_keys(ids)  # the restore
        bench.quiesce(target, table)
        t0 = time.perf_counter()
        out = bench.cli(target, "replay", "--since", "15m")
        with_start = time.perf_counter() - t0
        match = REPLAY_DONE.search(out)
        if match is None or bench.dbsize() != 0:
            raise RuntimeError(f"replay did not delete every key: {out}")
        bench.set_keys(ids)
        floor = unlink_floor(bench, ids)
    finally:
        bench.write_config(target)
    return Replay(
        events=int(match.group(1)),
        keys=int(match.group(2)),
        ours_s=float(match.group(3)),
        with_start_s=with_start,
        floor_s=floor,
    )


# ------------------------------------------------------------------- 3. write overhead


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


# -------------------------------------------------------------------------- reporting


def describe_machine(bench: Bench) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    redis_info: dict[str, Any] = bench.redis.info("server")
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model.group(1).strip() if model else "unknown",
        "ram": f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB" if mem else "unknown",
        "kernel": platform.release(),
        "postgresql": str(bench.execute("SHOW server_version")[0][0]),
        "redis": str(redis_info.get("redis_version")),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "redis-py": dist_version("redis"),
        "hiredis": dist_version("hiredis"),
        "loadavg at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def describe_code() -> str:
    """Which cdc_invalidator ran: its directory, and the git commit when it is a checkout."""
    import cdc_invalidator

    where = Path(cdc_invalidator.__file__).resolve().parent
    git = ["git", "-C", str(where)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    )
    if head.returncode != 0:
        return str(where)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", ":/src", ":/sql"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{where} at {head.stdout.strip()}{' with uncommitted changes' if dirty else ''}"


def describe_settings(bench: Bench, sizes: Sizes) -> dict[str, str]:
    out = {"code": describe_code()}
    out |= {f"pg {name}": str(bench.execute(f"SHOW {name}")[0][0]) for name in PG_SETTINGS_SHOWN}
    for name in ("save", "appendonly"):
        value = bench.redis.config_get(name).get(name)
        out[f"redis {name}"] = repr(value) if value == "" else str(value)
    out["listener"] = (
        "`cdc-invalidator run`, default settings but replay_history (0s in phases 1-3, 1h "
        "in the replay phase): "
        + ", ".join(
            f"{name}={f.get_default(call_default_factory=True)}"
            for name, f in Settings.model_fields.items()
            if name not in ("database_url", "redis_url", "tables", "replay_history")
            and not f.is_required()
        )
    )
    out["sizes"] = (
        f"latency {sizes.rate}/s, {round(sizes.rate * sizes.latency_s)} changes each for the "
        f"floor and ours in alternating {max(1, sizes.rate // 2)}-change blocks, after "
        f"{sizes.warmup} warm-up changes each; drain {sizes.drain_rows} rows, best of "
        f"{sizes.drain_repeats}; "
        f"big drain {sizes.big_rows or 'skipped (--big)'}; writes: pgbench, 2 clients, "
        f"{sizes.write_s} s runs, median of {sizes.write_rounds} interleaved rounds"
    )
    return out


def verdict(passed: bool | None) -> str:
    if passed is None:
        return "info"
    return "PASS" if passed else "**FAIL**"


# Targets per mode: (p50 ratio to the floor, write throughput ratio to unwatched).
TARGETS = {"trigger": (2.0, 0.70), "logical": (3.0, 0.85)}


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


def build_rows(
    *,
    mode: str,
    rate: int,
    floor: Latency,
    ours: Latency,
    drains: list[Row],
    writes: Writes,
) -> list[Row]:
    p50_target, write_target = TARGETS[mode]
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
            "< 10 ms",
            ours.p99_ms < 10,
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
    rows += drains
    ratio = writes.watched_tps / writes.plain_tps
    backend = (
        "" if writes.backend_us_per_event is None else f" + {writes.backend_us_per_event:.0f} µs"
    )
    rows += [
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
    return prefixed(mode, rows)


def prefixed(mode: str, rows: list[Row]) -> list[Row]:
    return [
        Row(f"[{mode}] {row.metric}", row.ours, row.floor, row.ratio, row.target, row.passed)
        for row in rows
    ]


def render(report: Report) -> str:
    out = ["# cdc-invalidator benchmark", ""]
    out.append(
        f"Run {report.raw['started']}, {report.raw['elapsed_s']:.0f} s, `{report.raw['argv']}`."
    )
    out.append("")
    out.append("| metric | ours | floor | ratio | target | pass |")
    out.append("|---|---|---|---|---|---|")
    for row in report.rows:
        cells = [row.metric, row.ours, row.floor, row.ratio, row.target, verdict(row.passed)]
        out.append("| " + " | ".join(cells) + " |")
    failed = [row.metric for row in report.rows if row.passed is False]
    out.append("")
    if failed:
        out.append(f"**{len(failed)} target(s) missed:** {'; '.join(failed)}")
        out.append("")
    out += [
        "Floors. Latency: a row trigger sends the row's keys in a pg_notify payload to a",
        "psycopg 3 `notifies()` loop that UNLINKs them (bench/floor_listener.py). It runs",
        "beside ours, each a separate process; the commits alternate between the floor's",
        "table and ours in half-second blocks, so both see the same machine. Deletion times",
        "come from Redis keyspace notifications timestamped by a third process",
        "(bench/keywatch.py). Drain: one Python process SELECTs the rows' key columns and",
        "UNLINKs the keys in a hiredis pipeline, one key per UNLINK (DESIGN.md's floor) or",
        "1,000 per UNLINK (batched). Ours is timed from its `listener_started` log line",
        "until every key is gone. Writes: the same pgbench UPDATE on an unwatched table.",
        "",
        "## Machine",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in report.machine.items()]
    out += ["", "## Noise: CPU used by other processes during each phase", ""]
    noisy = [k for k, v in report.foreign_cpu_pct.items() if v > NOISY_PCT]
    out += [f"- {k}: {v:.0f} % of a core" for k, v in report.foreign_cpu_pct.items()]
    if noisy:
        out.append(f"- **noisy** (over {NOISY_PCT} % of a core): {', '.join(noisy)}")
    out += ["", "## Settings", ""]
    out += [f"- {k}: {v}" for k, v in report.settings.items()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Sizes]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--big", action="store_true", help="also drain a 1M-change backlog")
    parser.add_argument("--rate", type=int, default=300, help="changes/s for the latency run")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (listener logs)")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also drain the backlog into a Redis Cluster of 3 masters (and its floor)",
    )
    parser.add_argument(
        "--drain-only", action="store_true", help="only the backlog drains (no latency, writes)"
    )
    parser.add_argument(
        "--capture",
        choices=[*MODES, "both"],
        default="both",
        help="which capture modes to measure (default: both, side by side)",
    )
    args = parser.parse_args(argv)
    args.capture = list(MODES) if args.capture == "both" else [args.capture]
    if args.quick:
        sizes = Sizes(args.rate, 3, 30, 10_000, 1, 100_000 if args.big else None, 3, 1)
    else:
        sizes = Sizes(args.rate, 10, 100, 100_000, 2, 1_000_000 if args.big else None, 10, 3)
    return args, sizes


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers stopped


def run_mode(
    bench: Bench,
    sizes: Sizes,
    meter: CpuMeter,
    report: Report,
    target: Target,
    *,
    cluster: ClusterKeys | None = None,
    drain_only: bool = False,
) -> list[Row]:
    mode = target.mode
    measured = (
        None if drain_only else measure_latency_and_writes(bench, sizes, meter, report, target)
    )

    print(f"[{mode}] 2. backlog drain of {sizes.drain_rows} changes", flush=True)
    with meter.phase(f"{mode} drain"):
        drain = measure_drain(bench, DRAIN, sizes.drain_rows, sizes.drain_repeats, target)
    report.raw[f"{mode} drain"] = asdict(drain)
    big = None
    if sizes.big_rows:
        print(f"[{mode}] 2. backlog drain of {sizes.big_rows} changes", flush=True)
        with meter.phase(f"{mode} big drain"):
            big = measure_drain(bench, BIG, sizes.big_rows, 1, target)
        report.raw[f"{mode} drain big"] = asdict(big)
    drains = drain_rows(mode, drain, big)
    if cluster is not None:
        print(
            f"[{mode}] 2b. backlog drain of {sizes.drain_rows} changes into a cluster", flush=True
        )
        with meter.phase(f"{mode} cluster drain"):
            on_cluster = measure_cluster_drain(
                bench, cluster, target, rows=sizes.drain_rows, repeats=sizes.drain_repeats
            )
        report.raw[f"{mode} cluster drain"] = asdict(on_cluster)
        drains += cluster_rows(drain, on_cluster)
    if measured is None:
        return prefixed(mode, drains)
    print(f"[{mode}] 4. replay of {sizes.drain_rows} invalidations", flush=True)
    with meter.phase(f"{mode} replay"):
        replayed = measure_replay(bench, DRAIN, sizes.drain_rows, target)
    report.raw[f"{mode} replay"] = asdict(replayed)
    print(
        f"  [{mode}] replay: {replayed.events} events, {replayed.keys} keys in "
        f"{replayed.ours_s:.3f} s ({replayed.with_start_s:.3f} s with process start), "
        f"floor {replayed.floor_s:.3f} s",
        flush=True,
    )
    floor, ours, writes = measured
    return [
        *build_rows(
            mode=mode, rate=sizes.rate, floor=floor, ours=ours, drains=drains, writes=writes
        ),
        *replay_rows(mode, replayed),
    ]


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
            "≤ 2x pipelined UNLINK",
            r.ours_s <= 2 * r.floor_s,
        ),
        Row(f"[{mode}] replay: incl. process start", f"{r.with_start_s:.3f} s", "", "", "", None),
    ]


def measure_latency_and_writes(
    bench: Bench, sizes: Sizes, meter: CpuMeter, report: Report, target: Target
) -> tuple[Latency, Latency, Writes]:
    mode = target.mode
    print(f"[{mode}] 1. latency: floor and cdc-invalidator side by side", flush=True)
    floor_proc = start_floor_listener(bench)
    listener = Listener(bench, f"{mode}-latency", target)
    try:
        listener.wait_started()
        with meter.phase(f"{mode} latency"):
            floor, ours = measure_latency(bench, sizes, floor_proc, listener, target)
    finally:
        listener.stop()
        stop_process(floor_proc)
    print(f"  floor p50 {floor.p50_ms:.3f} ms p99 {floor.p99_ms:.3f} ms", flush=True)
    print(f"  ours  p50 {ours.p50_ms:.3f} ms p99 {ours.p99_ms:.3f} ms", flush=True)
    report.raw[f"{mode} latency"] = {"floor": asdict(floor), "ours": asdict(ours)}

    print(f"[{mode}] 3. write overhead (pgbench)", flush=True)
    with meter.phase(f"{mode} writes"):
        writes = measure_writes(bench, sizes, target)
    report.raw[f"{mode} writes"] = asdict(writes)
    if target.logical:
        catch_up(bench, target)
    return floor, ours, writes


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


def main(argv: Sequence[str] | None = None) -> int:
    args, sizes = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    started = time.monotonic()
    report = Report()
    report.raw["started"] = datetime.now(UTC).isoformat(timespec="seconds")
    report.raw["argv"] = " ".join(["bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    workdir = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    print(f"starting PostgreSQL and Redis (work dir {workdir})", flush=True)
    bench = Bench(workdir)
    meter = CpuMeter([os.getpid(), bench.pg.pid or 0])
    cluster: ClusterKeys | None = None
    report.foreign_cpu_pct = meter.foreign_pct
    try:
        report.machine = describe_machine(bench)
        report.settings = describe_settings(bench, sizes)
        floor_ids, our_ids = latency_ids(sizes)
        print("loading tables", flush=True)
        bench.create_table(LAT_FLOOR, floor_ids, bench.admin)
        targets = [bench.targets[mode] for mode in args.capture]
        for target in targets:
            for table, ids in (
                (LAT_OURS, our_ids),
                (DRAIN, range(1, sizes.drain_rows + 1)),
                (W_PLAIN, range(1, WRITE_ROWS + 1)),
                (W_WATCHED, range(1, WRITE_ROWS + 1)),
                (BIG, range(1, (sizes.big_rows or 0) + 1)),
            ):
                bench.create_table(table, ids, target.admin)
            bench.write_config(target)
            bench.cli(target, "install")
        if args.cluster:
            print("starting a Redis Cluster of 3 masters", flush=True)
            cluster = ClusterKeys()
        for target in targets:
            report.rows += run_mode(
                bench, sizes, meter, report, target, cluster=cluster, drain_only=args.drain_only
            )
        report.machine["loadavg at end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    finally:
        if cluster is not None:
            cluster.close()
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report.raw["elapsed_s"] = time.monotonic() - started
    text = render(report)
    print()
    print(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text(text)
    payload = {
        "machine": report.machine,
        "settings": report.settings,
        "foreign_cpu_pct": report.foreign_cpu_pct,
        "rows": [asdict(row) | {"verdict": verdict(row.passed)} for row in report.rows],
        "raw": report.raw,
    }
    (RESULTS_DIR / "latest.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {RESULTS_DIR / 'latest.md'}, {RESULTS_DIR / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
