"""Sweeps against a big Redis: how long a TRUNCATE's sweep takes (all patterns in one
SCAN pass, against the old pass per pattern), and Redis's own latency meanwhile (a
client issuing GETs in a loop, its p50/p99/max while the sweep runs).

A building block for the benchmark's sweep phase (`measure_sweep(redis_url, keys)`),
and runnable alone on a throwaway Redis (it FLUSHes the database it is given):

    python bench/sweeps.py redis://127.0.0.1:6399/0 1000000 [COUNT ...]
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import synchronize as mp_sync
from multiprocessing.connection import Connection

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


def main(argv: list[str]) -> int:
    url, keys = argv[1], int(argv[2])
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
