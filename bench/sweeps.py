"""Sweeps against a big Redis: how long a TRUNCATE's sweep takes (all patterns in one
SCAN pass, against the old pass per pattern), Redis's own latency meanwhile (a client
issuing GETs in a loop, its p50/p99/max while the sweep runs), and the head-of-line
delay of a change committed right after the TRUNCATE (its COMMIT to its key gone, a
real listener running).

Building blocks for the benchmark's sweep phase (`measure_sweep(redis_url, keys)`,
`measure_head_of_line(dsn, redis_url, keys, capture)`), and runnable alone on
throwaway servers (it FLUSHes the Redis database it is given; the head-of-line run
creates two tables in the database, installs, and uninstalls after):

    python bench/sweeps.py REDIS_URL KEYS [COUNT ...]
    python bench/sweeps.py REDIS_URL KEYS --head-of-line DSN [trigger|logical]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import synchronize as mp_sync
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO

import psycopg
import redis

from cdc_invalidator.sink import RedisSink

# Two templates of the truncated table, as in issue 17's report (`orders`: two).
PATTERNS = ("order:*", "order:customer:*")
SWEPT_KEYS = 2000
LEGACY_COUNT = 1000  # scan_count's default before issue 17  # the table's own cached keys
LOAD_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class SweepFigures:
    count: int  # SCAN's COUNT
    one_pass: bool  # all patterns in one pass (False: a pass per pattern, as before)
    seconds: float
    deleted: int
    p50_ms: float  # Redis's GET latency while the sweep ran
    p99_ms: float
    max_ms: float
    probes: int


def load(client: redis.Redis, keys: int) -> None:
    """FLUSH, then `keys` unrelated keys and the table's SWEPT_KEYS, pipelined."""
    client.flushdb()
    pipe = client.pipeline(transaction=False)
    for start in range(0, keys, LOAD_CHUNK):
        pipe.mset({f"unrelated:{i}": "v" for i in range(start, min(keys, start + LOAD_CHUNK))})
        pipe.execute()
    refill(client)


def refill(client: redis.Redis) -> None:
    half = SWEPT_KEYS // 2
    client.mset({f"order:{i}": "v" for i in range(half)})
    client.mset({f"order:customer:{i}": "v" for i in range(half)})


def _probe(url: str, start: mp_sync.Event, stop: mp_sync.Event, out: Connection) -> None:
    """GET one key in a loop between `start` and `stop`; send the latencies (ms)."""
    client = redis.Redis.from_url(url)
    client.get("unrelated:1")  # connected before the start
    start.wait()
    latencies = []
    while not stop.is_set():
        began = time.perf_counter()
        client.get("unrelated:1")
        latencies.append((time.perf_counter() - began) * 1000)
    out.send(latencies)
    client.close()


def probe_latency(url: str, run: Callable[[], int]) -> tuple[int, list[float], float]:
    """run() while a client in another process (not sharing our GIL) GETs a key in a
    loop; (run's result, its latencies in ms, run's seconds)."""
    ctx = mp.get_context("spawn")
    start, stop = ctx.Event(), ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_probe, args=(url, start, stop, send), daemon=True)
    process.start()
    start.set()
    time.sleep(0.2)  # the probe is looping
    began = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - began
    stop.set()
    latencies: list[float] = receive.recv()
    process.join()
    return result, latencies, seconds


def measure_sweep(
    redis_url: str, keys: int, counts: tuple[int, ...] = (1000,), legacy: bool = True
) -> list[SweepFigures]:
    """Load `keys` unrelated keys, then: Redis's latency with no sweep (count 0), and
    a sweep of PATTERNS at each COUNT (and, if `legacy`, once per pattern at
    LEGACY_COUNT, as before issue 17)."""
    client = redis.Redis.from_url(redis_url)
    load(client, keys)
    out = []
    out.append(_idle(redis_url))
    runs = [(count, True) for count in counts] + ([(LEGACY_COUNT, False)] if legacy else [])
    for count, one_pass in runs:
        refill(client)
        sink = RedisSink(redis.Redis.from_url(redis_url), scan_count=count)

        def sweep(sink: RedisSink = sink, one_pass: bool = one_pass) -> int:
            if one_pass:
                return sink.sweep(PATTERNS)
            return sum(sink.sweep([pattern]) for pattern in PATTERNS)

        deleted, lat, seconds = probe_latency(redis_url, sweep)
        sink.close()
        out.append(_figures(count, one_pass, seconds, deleted, lat))
    client.close()
    return out


def _idle(redis_url: str) -> SweepFigures:
    """The same probe for a second with no sweep: the latency to compare with."""

    def idle() -> int:
        time.sleep(1.0)
        return 0

    _, lat, seconds = probe_latency(redis_url, idle)
    return _figures(0, True, seconds, 0, lat)


def _figures(
    count: int, one_pass: bool, seconds: float, deleted: int, lat: list[float]
) -> SweepFigures:
    lat.sort()
    return SweepFigures(
        count,
        one_pass,
        seconds,
        deleted,
        statistics.median(lat),
        lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        lat[-1],
        len(lat),
    )


@dataclass(frozen=True, slots=True)
class HeadOfLine:
    capture: str
    keys: int  # unrelated keys in Redis
    delay_ms: float  # the UPDATE's COMMIT to its key gone
    sweep_s: float  # the sweep's own time (its sweep_completed line)
    during_sweep: bool  # the key was gone before the sweep completed


TABLES = {
    "public.sweep_orders": ["order:{id}", "order:customer:{customer_id}"],
    "public.sweep_users": ["user:{id}"],
}


def _config(path: Path, dsn: str, redis_url: str, capture: str) -> None:
    tables = "".join(
        f"[tables.{json.dumps(t)}]\nkeys = {json.dumps(ks)}\n" for t, ks in TABLES.items()
    )
    path.write_text(
        f"database_url = {json.dumps(dsn)}\nredis_url = {json.dumps(redis_url)}\n"
        f"capture = {json.dumps(capture)}\n"
        # Second deletes would add a second sweep after the first: not what is measured.
        "second_delete_ms = 0\n" + tables
    )


def _cli(*args: str, stdout: IO[bytes] | int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CDC_INVALIDATOR_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "cdc_invalidator", *args]
    return subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT)


def _logged(log: Path, event: str) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            out.append(json.loads(line))
    return out


def _until(predicate: Callable[[], object], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.001)


def measure_head_of_line(
    dsn: str, redis_url: str, keys: int, capture: str = "trigger"
) -> HeadOfLine:
    """TRUNCATE sweep_orders (two templates) with `keys` unrelated keys in Redis, then a
    single-row UPDATE of sweep_users: how long after its COMMIT its key was gone, and
    whether that was before the sweep completed."""
    client = redis.Redis.from_url(redis_url)
    load(client, keys)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS sweep_orders, sweep_users")
        conn.execute("CREATE TABLE sweep_users (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO sweep_users VALUES (1, 'a'), (2, 'a')")
        conn.execute("CREATE TABLE sweep_orders (id int PRIMARY KEY, customer_id int)")
        conn.execute("INSERT INTO sweep_orders SELECT i, i FROM generate_series(1, 100) i")
    work = Path(tempfile.mkdtemp(prefix="cdc-bench-sweeps-"))
    config, log = work / "config.toml", work / "listener.log"
    _config(config, dsn, redis_url, capture)
    if _cli("install", "--config", str(config)).wait():
        raise RuntimeError("install failed")
    listener = _cli("run", "--config", str(config), stdout=log.open("wb"))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            client.set("user:2", "v")  # caught up: a change before is done
            _until(lambda: _logged(log, "listener_started"))
            conn.execute("UPDATE sweep_users SET name = 'b' WHERE id = 2")
            _until(lambda: not client.exists("user:2"))
            client.set("user:1", "v")
            conn.execute("TRUNCATE sweep_orders")
            conn.execute("UPDATE sweep_users SET name = 'b' WHERE id = 1")
            committed = time.perf_counter()
            _until(lambda: not client.exists("user:1"))
            gone = time.perf_counter()
            during = not _logged(log, "sweep_completed")
            _until(lambda: _logged(log, "sweep_completed"), timeout_s=600)
        seconds = float(str(_logged(log, "sweep_completed")[0]["seconds"]))
    finally:
        listener.terminate()
        listener.wait(60)
        _cli("uninstall", "--config", str(config)).wait()
        client.close()
    return HeadOfLine(capture, keys, (gone - committed) * 1000, seconds, during)


def main(argv: list[str]) -> int:
    url, keys = argv[1], int(argv[2])
    if len(argv) > 3 and argv[3] == "--head-of-line":
        capture = argv[5] if len(argv) > 5 else "trigger"
        h = measure_head_of_line(argv[4], url, keys, capture)
        print(
            f"keys={keys} {h.capture}: the UPDATE's key gone {h.delay_ms:.1f} ms after its "
            f"COMMIT ({'before' if h.during_sweep else 'after'} the sweep completed); "
            f"the sweep took {h.sweep_s:.2f} s"
        )
        return 0
    counts = tuple(int(c) for c in argv[3:]) or (1000,)
    for f in measure_sweep(url, keys, counts):
        print(
            f"keys={keys} "
            + (
                "no sweep"
                if not f.count
                else f"COUNT={f.count} {'one pass' if f.one_pass else 'per pattern'}"
            )
            + ": "
            f"{f.seconds:.2f} s, deleted {f.deleted}; GET p50 {f.p50_ms:.3f} ms, "
            f"p99 {f.p99_ms:.3f} ms, max {f.max_ms:.2f} ms ({f.probes} probes)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
