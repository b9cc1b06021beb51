"""Trigger mode's bulk statements, measured: one statement of `rows` rows (UPDATE, DELETE,
INSERT ... SELECT) on an unwatched table and on a watched one, with the listener running.

Reported per statement kind: the writer's time (the statement and its COMMIT, from the
client) unwatched and watched, interleaved (each round runs the unwatched one first,
then the watched one, each after a CHECKPOINT and a VACUUM); COMMIT -> the last of its
keys deleted from Redis (every row's key is cached before the statement, and Redis
holds nothing else); the listener's peak RSS; the bytes the statement added to the
queue (queue_v1 with its TOAST and index: replay_history keeps them) and to the WAL.

A function of a PostgreSQL DSN, a Redis URL and a row count (`measure`), for the bench's
bulk phase to reuse; `python bench/bulk_trigger.py --rows N` runs it on throwaway
servers. It owns both: it creates its tables, installs cdc_invalidator into the
database, and empties Redis.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from procs import proc_status_kb, stop_process, wait_for

PLAIN, WATCHED = "bulk_plain", "bulk_watched"
# Each round: the UPDATE, the DELETE of every row, the INSERT ... SELECT that refills.
STATEMENTS = {
    "update": "UPDATE {table} SET name = 'x'",
    "delete": "DELETE FROM {table}",
    "insert": "INSERT INTO {table} SELECT g, 'n' || g, 'e' || g FROM generate_series(1, {rows}) g",
}
QUEUE_BYTES = "SELECT pg_total_relation_size('cdc_invalidator.queue_v1')"


@dataclass
class Figures:
    """One statement kind's runs."""

    kind: str
    rows: int
    plain_s: list[float] = field(default_factory=list)
    watched_s: list[float] = field(default_factory=list)
    drained_s: list[float] = field(default_factory=list)  # COMMIT -> last key deleted
    queue_bytes: list[int] = field(default_factory=list)
    wal_plain: list[int] = field(default_factory=list)
    wal_watched: list[int] = field(default_factory=list)

    def lines(self) -> list[str]:
        med = statistics.median
        ratio = med(self.watched_s) / med(self.plain_s)
        per_change = med(self.queue_bytes) / self.rows
        return [
            f"{self.kind} of {self.rows:,} rows: writer {med(self.plain_s):.2f} s unwatched, "
            f"{med(self.watched_s):.2f} s watched ({ratio:.2f}x; runs "
            f"{_runs(self.plain_s)} / {_runs(self.watched_s)})",
            f"  COMMIT -> last key deleted: {_runs(self.drained_s)} s",
            f"  queue bytes: {med(self.queue_bytes):,.0f} ({per_change:.1f} per change); WAL "
            f"{med(self.wal_plain) / 2**20:.0f} MiB unwatched, "
            f"{med(self.wal_watched) / 2**20:.0f} MiB watched",
        ]


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def measure(
    dsn: str, redis_url: str, rows: int, rounds: int = 1, workdir: Path | None = None
) -> tuple[list[Figures], float]:
    """Every statement kind's figures, and the listener's peak RSS in MB."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="bulk-trigger-"))
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in (PLAIN, WATCHED):
            conn.execute(f"DROP TABLE IF EXISTS {table}".encode())
            conn.execute(
                f"CREATE TABLE {table} (id int PRIMARY KEY, name text, email text)".encode()
            )
            conn.execute(STATEMENTS["insert"].format(table=table, rows=rows).encode())
            conn.execute(f"VACUUM ANALYZE {table}".encode())
    config = workdir / "bulk.toml"
    config.write_text(
        f'database_url = "{dsn}"\nredis_url = "{redis_url}"\n\n'
        f'[tables."public.{WATCHED}"]\nkeys = ["{WATCHED}:{{id}}"]\n'
    )
    cli = [sys.executable, "-m", "cdc_invalidator"]
    subprocess.run([*cli, "install", "--config", str(config)], check=True)
    log = (workdir / "listener.log").open("w")
    listener = subprocess.Popen(
        [*cli, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    figures = {kind: Figures(kind, rows) for kind in STATEMENTS}
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_for(lambda: _listening(conn), 30, "the listener's lock")
            for _ in range(rounds):
                for kind, statement in STATEMENTS.items():
                    _round(conn, r, listener, statement, figures[kind])
        peak_mb = proc_status_kb(listener.pid, "VmHWM") / 1024
    finally:
        stop_process(listener)
        log.close()
    return list(figures.values()), peak_mb


def _listening(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
    return bool(row and row[0])


def _round(
    conn: psycopg.Connection[tuple[object, ...]],
    r: redis.Redis,
    listener: subprocess.Popen[bytes],
    statement: str,
    figures: Figures,
) -> None:
    rows = figures.rows
    for table in (PLAIN, WATCHED):
        if table == WATCHED:
            # Every row's key cached (for the INSERT: a cached "not found").
            for start in range(1, rows + 1, 10_000):
                ids = range(start, min(start + 10_000, rows + 1))
                r.mset({f"{WATCHED}:{i}": "1" for i in ids})
            queue_before = _int(conn, QUEUE_BYTES)
        conn.execute("CHECKPOINT")
        wal_before = _lsn(conn)
        started = time.monotonic()
        conn.execute(statement.format(table=table, rows=rows).encode())
        committed = time.monotonic()
        wal = _int(conn, f"SELECT pg_current_wal_lsn() - '{wal_before}'::pg_lsn")
        if table == PLAIN:
            figures.plain_s.append(committed - started)
            figures.wal_plain.append(wal)
        else:
            figures.watched_s.append(committed - started)
            figures.wal_watched.append(wal)

            def drained() -> bool:
                if listener.poll() is not None:
                    raise RuntimeError(f"the listener exited {listener.returncode}")
                return r.dbsize() == 0

            figures.drained_s.append(wait_for(drained, 600, "every key deleted") - committed)
            figures.queue_bytes.append(_int(conn, QUEUE_BYTES) - queue_before)
        conn.execute(f"VACUUM {table}".encode())


def _int(conn: psycopg.Connection[tuple[object, ...]], query: str) -> int:
    """A query's one value, a size or a WAL distance (numeric), as an int."""
    row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return int(str(row[0]))


def _lsn(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dsn", help="an existing database (default: a throwaway server)")
    parser.add_argument("--redis-url", help="an existing, empty Redis")
    args = parser.parse_args()
    if args.dsn and args.redis_url:
        figures, peak = measure(args.dsn, args.redis_url, args.rows, args.rounds)
    else:
        from cdc_invalidator.demo.servers import PostgresServer, RedisServer  # noqa: PLC0415

        with PostgresServer.create() as pg, RedisServer.create() as rs:
            figures, peak = measure(pg.dsn(), rs.url, args.rows, args.rounds)
    for f in figures:
        print("\n".join(f.lines()))
    print(f"listener peak RSS: {peak:.0f} MB")


if __name__ == "__main__":
    main()
