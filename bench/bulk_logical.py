"""One bulk statement in logical mode: `UPDATE big SET name = 'x'` over `rows` rows, two
templates per row (`big:{id}`, `big:name:{name}`: 2 keys cached per row).

`measure(dsn, redis_url, rows)` reports the writer's statement unwatched (a plain table,
no publication, no slot) and watched (installed, the listener running), the WAL each
wrote, COMMIT → last key deleted, and the listener's peak RSS. The bench's bulk phase can
call it; run alone (`python bench/bulk_logical.py [rows]`) it starts its own throwaway
PostgreSQL (default settings: logical_decoding_work_mem 64MB) and Redis. With
`--profile FILE` the listener runs under cProfile (slower: read its shares, not its
times).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.config import write_config
from tests.support.servers import PostgresServer, RedisServer

from procs import proc_cpu_s, proc_status_kb, stop_process, wait_for

TEMPLATES = {"public.big": ["big:{id}", "big:name:{name}"]}


def measure(  # noqa: PLR0913 - the options are keyword-only
    dsn: str,
    redis_url: str,
    rows: int,
    *,
    workdir: Path | None = None,
    profile: Path | None = None,
    log_level: str = "info",
    history: str = "2h",  # the default
    second_delete_ms: int = 300,  # the default
) -> dict[str, Any]:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="bulk-logical-"))
    r = redis.Redis.from_url(redis_url, socket_timeout=120)
    admin = psycopg.connect(dsn, autocommit=True)
    admin.execute("DROP TABLE IF EXISTS big")
    admin.execute("CREATE TABLE big (id int PRIMARY KEY, name text)")
    admin.execute("INSERT INTO big SELECT g, 'n' || g FROM generate_series(1, %s) g", [rows])
    admin.execute("VACUUM ANALYZE big")
    unwatched_s, unwatched_wal = _update(dsn, "UPDATE big SET name = 'u' || id")
    admin.execute("UPDATE big SET name = 'n' || id")
    admin.execute("VACUUM ANALYZE big")

    config = write_config(
        workdir / "logical.toml",
        database_url=dsn,
        redis_url=redis_url,
        tables=TEMPLATES,
        capture="logical",
        log_level=log_level,
        second_delete_ms=second_delete_ms,
        replay_history=history,
    )
    run = [sys.executable, "-m", "cdc_invalidator"]
    subprocess.run([*run, "install", "--config", str(config)], check=True, capture_output=True)
    if profile is not None:
        run = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "cdc_invalidator"]
    log = (workdir / "listener.log").open("w")
    listener = subprocess.Popen(
        [*run, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(
            lambda: (
                admin.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 'cdc_invalidator'"
                ).fetchone()
                == (True,)
            ),
            60,
            "the listener streaming",
        )
        r.flushdb()
        pipe = r.pipeline(transaction=False)
        for start in range(1, rows + 1, 10_000):
            ids = range(start, min(start + 10_000, rows + 1))
            pipe.mset({f"big:{i}": "1" for i in ids} | {f"big:name:n{i}": "1" for i in ids})
            pipe.execute()
        cached = r.dbsize()
        cpu_before = proc_cpu_s(listener.pid)
        sender = admin.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_invalidator'"
        ).fetchone()
        sender_pid = int(sender[0]) if sender and sender[0] else None
        sender_before = proc_cpu_s(sender_pid) if sender_pid else 0.0
        watched_s, watched_wal, committed = _update(dsn, "UPDATE big SET name = 'x'", at=True)
        wait_for(lambda: r.dbsize() == 0, 600, "every key deleted", interval_s=0.01)
        gone = time.monotonic() - committed
        rss_mb = proc_status_kb(listener.pid, "VmHWM") / 1024
        cpu_s = proc_cpu_s(listener.pid) - cpu_before
        sender_s = proc_cpu_s(sender_pid) - sender_before if sender_pid else None
    finally:
        stop_process(listener)
        log.close()
        admin.close()
    return {
        "rows": rows,
        "keys_cached": cached,
        "writer_unwatched_s": round(unwatched_s, 3),
        "writer_watched_s": round(watched_s, 3),
        "writer_ratio": round(watched_s / unwatched_s, 2),
        "wal_unwatched_mb": round(unwatched_wal / 2**20, 1),
        "wal_watched_mb": round(watched_wal / 2**20, 1),
        "commit_to_last_key_deleted_s": round(gone, 3),
        "listener_peak_rss_mb": round(rss_mb, 1),
        # From the statement's start to the last key deleted.
        "listener_cpu_s": round(cpu_s, 2),
        "walsender_cpu_s": None if sender_s is None else round(sender_s, 2),
    }


def _update(dsn: str, statement: str, at: bool = False) -> Any:
    """The statement in its own transaction: its time to COMMIT, the WAL written, and
    (at) when COMMIT returned (time.monotonic())."""
    with psycopg.connect(dsn) as conn:
        before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        started = time.monotonic()
        conn.execute(statement)
        conn.commit()
        committed = time.monotonic()
        wal = conn.execute(
            "SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", [before[0] if before else None]
        ).fetchone()
    out = (committed - started, int(wal[0]) if wal else 0)
    return (*out, committed) if at else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--history", default="2h", help="replay_history (default: 2h)")
    parser.add_argument("--second-delete-ms", type=int, default=300)
    args = parser.parse_args()
    pg, rs = PostgresServer.create(), RedisServer.create()
    pg.start()
    rs.start()
    try:
        work = Path(tempfile.mkdtemp(prefix="bulk-logical-"))
        print(work)
        got = measure(
            pg.dsn(),
            rs.url,
            args.rows,
            workdir=work,
            profile=args.profile,
            log_level="debug",
            history=args.history,
            second_delete_ms=args.second_delete_ms,
        )
        print(json.dumps(got, indent=1))
    finally:
        rs.destroy()
        pg.destroy()


if __name__ == "__main__":
    main()
