"""The benchmark's environment: its own PostgreSQL and Redis (and, for --cluster, a
Redis Cluster), the tables and the listener's config per capture mode, and the
listener process itself, `python -m cdc_invalidator run` with default settings."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import psycopg
import redis
from psycopg import sql
from redis.crc import key_slot

# Run as a script (bench/run.py): the repository's root goes on the path for the test
# rig's throwaway servers (tests/support is not part of the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import pgversion
from tests.support.pgversion import PgInstall
from tests.support.servers import (
    PostgresServer,
    RedisClusterServer,
    RedisServer,
    ServerError,
)

from procs import proc_cpu_s, proc_status_kb, stop_process, wait_for

BENCH_DIR = Path(__file__).resolve().parent
KEYWATCH = BENCH_DIR / "keywatch.py"
FLOOR_LISTENER = BENCH_DIR / "floor_listener.py"
FLOOR_LOGICAL = BENCH_DIR / "floor_logical.py"
CONTROL_CHANNEL = "cdc-bench:control"  # keywatch.py listens for "dump" here
FLOOR_CHANNEL = "cdc_bench_floor"

TEMPLATES = ["user:{id}", "user:email:{email}"]
# Tables: users(id, email, n); every benchmark UPDATE bumps n, keys use id and email.
LAT_FLOOR = "lat_floor_users"  # the latency floor's table: not watched by cdc_invalidator
LAT_OURS = "lat_users"
DRAIN = "drain_users"
BIG = "big_users"
W_WATCHED = "w_watched"
W_PLAIN = "w_plain"
BULK_WATCHED = "bulk_users"  # phase 8: one bulk statement, and a backfill in steps
BULK_PLAIN = "bulk_plain"  # its unwatched twin
# Phase 9's TRUNCATE: a table of its own, with templates no other table's keys match, so
# that the sweep deletes none of the concurrent change's keys.
SWEPT = "sweep_orders"
SWEPT_TEMPLATES = ["order:{id}", "order:by_email:{email}"]
WATCHED = [LAT_OURS, DRAIN, BIG, W_WATCHED, BULK_WATCHED, SWEPT]
MODES = ("trigger", "logical")
# Logical capture runs on its own database of the same server (its install removes
# triggers, and its publication must not cover the trigger mode's tables), with the
# same tables.
LOGICAL_DB = "logical"
SLOT = "cdc_bench"
WRITE_ROWS = 100_000


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
    bulk_rows: int  # phase 8's one statement (a backfill of as many rows in 10k steps)
    sweep_keys: tuple[int, ...]  # phase 9: the unrelated keys Redis holds, per run


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


def user_keys(i: int) -> tuple[str, str]:
    return f"user:{i}", f"user:email:u{i}@example.com"


def pg_install(major: int | None) -> PgInstall:
    """PostgreSQL `major`'s programs (None: the system's). RuntimeError: none here."""
    try:
        return pgversion.select(major)
    except ServerError as exc:
        raise RuntimeError(str(exc)) from None


class Bench:
    """The servers, an admin connection and the listener's config file."""

    def __init__(self, workdir: Path, pg: PgInstall) -> None:
        self.workdir = workdir
        self.pg_install = pg  # which PostgreSQL (--pg): the report names it
        # Default durable settings: fsync on.
        self.pg = PostgresServer.create(bindir=pg.bindir)
        # DEBUG POPULATE loads the sweep phase's millions of unrelated keys in seconds.
        self.rs = RedisServer.create(["--enable-debug-command", "local"])
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

    def write_config(self, target: Target, redis_url: str | None = None) -> None:
        # Every setting at its default (replay_history too: processed queue rows, or
        # logical mode's history, kept for two hours), but where the listener connects,
        # and source_mark: its key in Redis would be counted among the keys each phase
        # waits to see gone (the latency phase's warm-up waited for good). The mark is
        # read and written as the listener connects, never on a path measured here.
        lines = [
            f"database_url = {json.dumps(target.dsn)}",
            f"redis_url = {json.dumps(redis_url or self.rs.url)}",
            "source_mark = false",
        ]
        if target.logical:
            lines += ['capture = "logical"', f"slot_name = {json.dumps(SLOT)}"]
        for table in WATCHED:
            lines.append(f'[tables."public.{table}"]')
            lines.append(f"keys = {json.dumps(SWEPT_TEMPLATES if table == SWEPT else TEMPLATES)}")
        target.config.write_text("\n".join(lines) + "\n")

    def write_config_like(self, target: Target, like: Target, redis_url: str) -> None:
        """`like`'s configuration file, with another Redis: the same mapping."""
        text = like.config.read_text()
        line = f"redis_url = {json.dumps(self.rs.url)}"
        if line not in text:
            raise RuntimeError(f"{like.config} does not have {line!r}")
        target.config.write_text(text.replace(line, f"redis_url = {json.dumps(redis_url)}", 1))

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

    def queue_len(self, table: str) -> int:
        """Changes of `table` in our queue table (processed or not: a design may keep
        some), a pack of a statement's rows weighing its rows."""
        query = (
            "SELECT coalesce(sum(coalesce(rows, 1)), 0) FROM cdc_invalidator.queue_v1 "
            "WHERE table_name = %s"
        )
        return int(self.execute(query, [table])[0][0])

    def keyspace_events(self, on: bool) -> None:
        self.redis.config_set("notify-keyspace-events", "Kg" if on else "")

    def quiesce(self, target: Target, *tables: str) -> None:
        """Housekeeping before a timed run, outside the timing: vacuum and checkpoint."""
        for table in tables:
            target.admin.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.SQL(table)))
        self.admin.execute("CHECKPOINT")


def profiler() -> str:
    """py-spy for BENCH_PROFILE: not a dependency, installed into the bench's virtualenv,
    whose bin/ `make bench` does not put on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    found = shutil.which("py-spy", path=path)
    if found is None:
        raise RuntimeError(
            "BENCH_PROFILE is set but py-spy is not installed: .venv/bin/pip install py-spy"
        )
    return found


class Listener:
    """`python -m cdc_invalidator run --config ...`: the product, default settings."""

    def __init__(self, bench: Bench, name: str, target: Target) -> None:
        profile_dir = os.environ.get("BENCH_PROFILE")
        py_spy = profiler() if profile_dir else None
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
        if profile_dir and py_spy:
            # Sample the listener with py-spy (folded stacks, idle time included: waits on
            # PostgreSQL and Redis show as such) until it exits. Read the shares, not the
            # timings: the sampler takes CPU from the same two cores.
            out = Path(profile_dir) / f"listener-{name}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            sampler = [py_spy, "record", "--idle", "-r", "250", "-f", "raw"]
            bench.spawn(
                [*sampler, "-o", str(out), "--pid", str(self.proc.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
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

    def wait_redis_met(self) -> None:
        """After a switch to another Redis: until the listener recorded the new server's
        identity, or replayed what the switch owes (a Redis it has not seen may have
        lost deletes), which a timed phase must not pay for."""
        met = {"redis_identity_recorded", "replay_done"}

        def done() -> bool:
            self.check()
            return any(event.get("event") in met for event in self.events())

        wait_for(done, 300, "the listener to meet its Redis", interval_s=0.05)

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
        table = self.nodes[0].execute_command("CLUSTER", "SLOTS")
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
