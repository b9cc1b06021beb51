"""Phase 5: what a column filter buys the cache. A cache-aside workload on two identical
tables, watched alike but for one setting: `hr_judged` has `ignore_columns = ["seen"]`,
`hr_plain` has none. 90 % of the updates bump only `seen` (a last-seen-at stamp no cache
holds), 10 % change `n` (which the cached value holds). The same updates of the same ids
go to both tables, the readers read both alike, and the listener (default settings) runs
for both: the difference in hit rate is the filter's. The cache starts warm (every hot
row cached), so that the misses counted are the invalidations'. After the writers stop, the
listener is awaited (a marker change of each table is invalidated) and every cached
value is compared with its row: a filter that hid a real change would show stale keys.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from psycopg import sql

from harness import Bench, Listener, Sizes, Target
from report import Row

PLAIN = "hr_plain"
JUDGED = "hr_judged"
HOT_ROWS = 1_000
WRITES_PER_S = 200  # per table: each hot row changes every 5 s (every 50 s counting n only)
READS_PER_S = 2_000  # per table: each hot row is read twice a second
COUNTED_SHARE = 0.10
MARKER_ID = HOT_ROWS + 1


def key(table: str, i: int) -> str:
    return f"hr:{table}:{i}"


def template(table: str) -> str:
    return f"hr:{table}:{{id}}"


@dataclass
class HitRate:
    seconds: float
    writes: int  # per table
    counted_writes: int
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    stale_at_end: dict[str, int] = field(default_factory=dict)

    def rate(self, table: str) -> float:
        total = self.hits[table] + self.misses[table]
        return self.hits[table] / total if total else 0.0


def prepare_hit_rate(bench: Bench, target: Target) -> None:
    """Both tables (id, email, n, seen), in the target's config, installed."""
    for table in (PLAIN, JUDGED):
        bench.create_table(table, range(1, MARKER_ID + 1), target.admin)
        target.admin.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS seen int NOT NULL DEFAULT 0").format(
                sql.Identifier(table)
            )
        )
    with target.config.open("a") as f:
        f.write(f'[tables."public.{PLAIN}"]\nkeys = {json.dumps([template(PLAIN)])}\n')
        f.write(
            f'[tables."public.{JUDGED}"]\nkeys = {json.dumps([template(JUDGED)])}\n'
            'ignore_columns = ["seen"]\n'
        )
    bench.cli(target, "install")


def _paced(rate: float, stop: threading.Event) -> Any:
    """Yields at `rate` per second until stopped (catching up after a stall)."""
    start = time.monotonic()
    n = 0
    while not stop.is_set():
        n += 1
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield n


def _reader(
    dsn: str, url: str, seed: int, stop: threading.Event, counts: dict[str, dict[str, int]]
) -> None:
    """Cache-aside on both tables: GET; on a miss SELECT the row and SET it (no TTL).
    `counts` is this reader's own: {"hits": {table: n}, "misses": {table: n}}."""
    rng = random.Random(seed)
    r = redis.Redis.from_url(url, decode_responses=True)
    hits = counts["hits"] = dict.fromkeys((PLAIN, JUDGED), 0)
    misses = counts["misses"] = dict.fromkeys((PLAIN, JUDGED), 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in _paced(READS_PER_S / 2, stop):  # two readers
            i = rng.randint(1, HOT_ROWS)
            for table in (PLAIN, JUDGED):
                if r.get(key(table, i)) is not None:
                    hits[table] += 1
                    continue
                misses[table] += 1
                row = conn.execute(
                    sql.SQL("SELECT email, n FROM {} WHERE id = %s").format(sql.Identifier(table)),
                    [i],
                ).fetchone()
                r.set(key(table, i), json.dumps(row))
    r.close()


def _writer(dsn: str, stop: threading.Event, out: HitRate) -> None:
    rng = random.Random(7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in _paced(WRITES_PER_S, stop):
            i = rng.randint(1, HOT_ROWS)
            column = "n" if rng.random() < COUNTED_SHARE else "seen"
            out.counted_writes += column == "n"
            out.writes += 1
            for table in (PLAIN, JUDGED):
                conn.execute(
                    sql.SQL("UPDATE {0} SET {1} = {1} + 1 WHERE id = %s").format(
                        sql.Identifier(table), sql.Identifier(column)
                    ),
                    [i],
                )


def _await_listener(bench: Bench, target: Target) -> None:
    """Each table's marker row changed (a counted column) and its key invalidated: every
    change committed before it has been processed."""
    for table in (PLAIN, JUDGED):
        bench.redis.set(key(table, MARKER_ID), "marker")
        target.admin.execute(
            sql.SQL("UPDATE {} SET n = n + 1 WHERE id = %s").format(sql.Identifier(table)),
            [MARKER_ID],
        )
    deadline = time.monotonic() + 60
    while bench.redis.exists(*(key(t, MARKER_ID) for t in (PLAIN, JUDGED))):
        if time.monotonic() > deadline:
            raise RuntimeError("hit rate: the listener did not process the marker changes")
        time.sleep(0.01)


def _warm(bench: Bench, target: Target) -> None:
    """Every hot row cached, as a reader would have cached it."""
    pipe = bench.redis.pipeline(transaction=False)
    for table in (PLAIN, JUDGED):
        rows = target.admin.execute(
            sql.SQL("SELECT id, email, n FROM {} WHERE id <= %s").format(sql.Identifier(table)),
            [HOT_ROWS],
        ).fetchall()
        pipe.mset({key(table, i): json.dumps([email, n]) for i, email, n in rows})
    pipe.execute()


def _stale(bench: Bench, target: Target, table: str) -> int:
    rows = target.admin.execute(
        sql.SQL("SELECT id, email, n FROM {} WHERE id <= %s").format(sql.Identifier(table)),
        [HOT_ROWS],
    ).fetchall()
    cached = bench.redis.mget([key(table, i) for i, _, _ in rows])
    return sum(
        1
        for (_, email, n), value in zip(rows, cached, strict=True)
        if value is not None and json.loads(value) != [email, n]
    )


def measure_hit_rate(bench: Bench, sizes: Sizes, target: Target) -> HitRate:
    seconds = max(3.0, sizes.latency_s)
    out = HitRate(seconds=seconds, writes=0, counted_writes=0)
    _warm(bench, target)  # a cold start's misses would blur the invalidations' own
    listener = Listener(bench, f"{target.mode}-hit-rate", target)
    try:
        listener.wait_started()
        stop = threading.Event()
        counts: list[dict[str, dict[str, int]]] = [{}, {}]
        threads = [
            threading.Thread(target=_reader, args=(target.dsn, bench.rs.url, s, stop, counts[s]))
            for s in (0, 1)
        ]
        threads.append(threading.Thread(target=_writer, args=(target.dsn, stop, out)))
        for thread in threads:
            thread.start()
        time.sleep(seconds)  # the workload's duration: the figure is a rate over it
        stop.set()
        for thread in threads:
            thread.join()
        for kind, total in (("hits", out.hits), ("misses", out.misses)):
            for table in (PLAIN, JUDGED):
                total[table] = sum(c[kind][table] for c in counts)
        _await_listener(bench, target)
        out.stale_at_end = {table: _stale(bench, target, table) for table in (PLAIN, JUDGED)}
    finally:
        listener.stop()
    return out


def hit_rate_rows(hr: HitRate) -> list[Row]:
    """The filter's benefit (without the mode prefix)."""
    plain, judged = hr.rate(PLAIN), hr.rate(JUDGED)
    # The row's name holds the workload as set, the same in every run (a comparison with
    # the baseline matches rows by name); the pace and share met are in the cell.
    what = (
        f"{WRITES_PER_S} updates/s on {HOT_ROWS} hot rows, "
        f"{COUNTED_SHARE:.0%} changing a cached column"
    )
    met = (
        f"{hr.writes / hr.seconds:.0f} updates/s, "
        f"{hr.counted_writes / max(hr.writes, 1):.0%} changing a cached column"
    )
    return [
        Row(
            f"cache hit rate, cache-aside, {what}: ignore_columns vs none",
            f"{judged:.1%} (stale at end: {hr.stale_at_end[JUDGED]}; met {met})",
            f"{plain:.1%} (stale at end: {hr.stale_at_end[PLAIN]})",
            f"{(1 - plain) / max(1 - judged, 1e-9):.1f}x fewer misses",
            "",
            None,
        )
    ]
