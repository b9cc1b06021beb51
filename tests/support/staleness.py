"""Staleness measured the way Meta's Polaris does: quiet runs (no fault) of the chaos
engine (tests/support/chaos.py) that provoke the cache-aside stale-set race and report
how stale the cache got, per listener setting and reader slowness. Used by
tests/test_chaos.py (short runs, `make test`) and by `make chaos CHAOS_ARGS=--staleness`
(`python -m tests.chaos --staleness`, which prints one table).

The race (Facebook, "Scaling Memcache", §3.2.1): a reader misses and reads the row, the
row changes and commits, the listener deletes the key, and the reader, slower than all
of that, SETs the old value. With no TTL it stays until the row's next change.

The workload, per capture mode, as issue 15 measured it:

- one writer: single-row UPDATEs of 40 hot rows, paced at about 100 a second, each
  changing the cached value (a new `version` from a sequence, a new `name`);
- 6 readers doing cache-aside on the hot rows' keys (`user:{id}`) with no TTL: GET; on
  a miss SELECT the row, pause a random 0 to N ms (an app building the value, a GC
  pause), SET it. N = 100 and N = 1000;
- the listener, a real process, configured as one of:
  - `none`: `second_delete_ms = 0`, no protection (the control);
  - `defaults`: nothing about second deletes in its config: whatever the listener's
    defaults are when the run happens (the report says what it resolved to);
  - `leases`: the listener's defaults, and readers that go through
    `cdc_invalidator.lease.LeaseCache(client).get_or_fill(key, loader, ttl=None)`: the
    loader does the SELECT and the pause; the helper fills only while its lease holds.

Each run lasts `duration_s` (15 s by default). Then: the writer stops, the readers go
on a moment (refilling the cache) and stop, a marker written last is awaited until the
listener acknowledged it (and deleted its key), the listener is stopped with SIGTERM
(doing the second deletes it still owes), and every hot key in Redis is compared with
its row: **keys stale at the end** (of 40; a key not cached is not stale).

Stale reads, Polaris-style (tests/support/stale_reads.py has the exact definitions):
every cache hit is compared with the row states committed before its GET was sent. A
hit is stale if its value had been superseded by a committed write; "still wrong 50 ms
later" if the GET came 50 ms or more after the commit that superseded it (the
listener's own delay stays below that: what is left is the race). Both are given as a
share of all hits. Episodes (one key serving one stale value) last from that commit to
the last read that still saw the value, split into races (a reader SET the value after
that commit) and late deletes. A lease reader's hit is a call whose loader did not run;
a call whose loader ran counts as a SET (the helper does not say whether its fill was
refused), from when the loader returned.

Pass or fail (`passed()`): leases with readers up to 1 s must leave no key stale at the
end and at most 0.1 % of hits still wrong 50 ms later (issue 15); the listener's
defaults with readers up to 100 ms must leave no key stale at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cdc_invalidator.lease import LeaseCache
from tests.support.chaos import Chaos, InDoubt, Params, Stats, own_servers, render
from tests.support.env import Servers, make_env
from tests.support.servers import PostgresServer, RedisServer
from tests.support.stale_reads import Durations, StaleReadSummary

CONFIGS = ("none", "defaults", "leases")
SLOW_MS = (100.0, 1000.0)
HOT_ROWS = 40
# The bounds: leases with readers up to 1 s, the defaults with readers up to 100 ms.
LEASE_READERS_MS = 1000.0
LEASE_STILL_WRONG_PCT = 0.1
DEFAULTS_READERS_MS = 100.0
# How long the readers refill the cache at the end at most, besides 3 pauses of theirs.
REFILL_S = 1.0

SELECT_ROW = "SELECT id, email, name, version FROM users WHERE id = %s"
UPDATE_ROW = (
    "UPDATE users SET version = nextval('chaos_version'), name = %s WHERE id = %s"
    " RETURNING 'update', id, email, version"
)


@dataclass
class StalenessParams:
    capture: str = "trigger"
    config: str = "defaults"  # one of CONFIGS
    slow_ms: float = 100.0  # a reader pauses 0 to this between its SELECT and its SET
    duration_s: float = 15.0
    writes_per_s: float = 100.0
    readers: int = 6
    hot_rows: int = HOT_ROWS
    seed: int = 0


def is_rendering(value: str) -> bool:
    """Whether a cached value is what a reader caches (a row's JSON, or `null`), and not
    something else a helper keeps under the key (a lease)."""
    try:
        cached = json.loads(value)
    except ValueError:
        return False
    return cached is None or (isinstance(cached, list) and len(cached) == 4)


@dataclass
class StalenessResult:
    capture: str
    config: str
    slow_ms: float
    second_delete_ms: int  # what the listener ran with
    hot_rows: int
    seconds: float = 0.0
    writing_s: float = 0.0  # how long the writer ran
    writes: int = 0
    reads: int = 0
    hits: int = 0
    sets: int = 0
    errors: int = 0
    max_gap_ms: float = 0.0
    slow_sets: int = 0  # SELECT-to-SET gap longer than second_delete_ms
    keys_cached: int = 0  # hot keys holding a value at the end
    keys_stale: list[str] = field(default_factory=list)
    stale_races: list[str] = field(default_factory=list)  # of those: SET after the change
    not_values: list[str] = field(default_factory=list)  # hot keys holding something else
    stale_reads: StaleReadSummary = field(default_factory=StaleReadSummary)
    listener: dict[str, int] = field(default_factory=dict)  # its final counters

    @property
    def label(self) -> str:
        if self.config == "none":
            return "second_delete_ms = 0"
        setting = f"second_delete_ms = {self.second_delete_ms}"
        return f"defaults ({setting})" if self.config == "defaults" else f"leases ({setting})"

    @property
    def stale_pct(self) -> float:
        return 100 * self.stale_reads.stale_reads / self.hits if self.hits else 0.0

    @property
    def still_wrong_pct(self) -> float:
        return 100 * self.stale_reads.still_wrong / self.hits if self.hits else 0.0

    def failures(self) -> list[str]:
        """What breaks the issue's bounds in this run."""
        out = []
        where = f"{self.capture} {self.label}, readers <= {self.slow_ms:.0f} ms"
        bounded = {
            "leases": self.slow_ms <= LEASE_READERS_MS,
            "defaults": self.slow_ms <= DEFAULTS_READERS_MS,
        }
        if bounded.get(self.config) and self.keys_stale:
            out.append(f"{where}: {len(self.keys_stale)} keys stale at the end")
        if bounded.get(self.config) and self.config == "leases":
            if not self.hits:
                out.append(f"{where}: no cache hit to measure")
            elif self.still_wrong_pct > LEASE_STILL_WRONG_PCT:
                out.append(
                    f"{where}: {self.still_wrong_pct:.2f} % of hits still wrong 50 ms later"
                    f" (at most {LEASE_STILL_WRONG_PCT} %)"
                )
        return out

    def lines(self) -> list[str]:
        sr = self.stale_reads
        return [
            f"{self.capture}, {self.label}, readers up to {self.slow_ms:.0f} ms,"
            f" {self.seconds:.0f} s:",
            f"  writes {self.writes}, reads {self.reads} ({self.hits} hits, {self.sets} SETs),"
            f" client errors {self.errors}",
            f"  stale hits {sr.stale_reads} ({self.stale_pct:.2f} %), still wrong 50 ms later"
            f" {sr.still_wrong} ({self.still_wrong_pct:.2f} %); stale SETs {sr.stale_sets}",
            f"  episodes: races {sr.quiet_races}; late deletes {sr.quiet_late}",
            f"  SELECT-to-SET gap: max {self.max_gap_ms:.0f} ms,"
            f" {self.slow_sets} longer than second_delete_ms",
            f"  listener: {self.listener.get('keys_deleted', 0)} keys deleted,"
            f" {self.listener.get('keys_deleted_again', 0)} deleted again",
            f"  hot keys at the end: {self.keys_cached} cached, {len(self.keys_stale)} stale"
            f" ({len(self.stale_races)} SET by a reader after the change)"
            + (f", {len(self.not_values)} holding no value (a lease?)" if self.not_values else ""),
        ]


class Staleness(Chaos):
    """One quiet run: the hot-row writer, the cache-aside readers, the real listener."""

    def __init__(
        self,
        sp: StalenessParams,
        *,
        pg: PostgresServer,
        rd: RedisServer,
        dsn: str,
        workdir: Path,
        say: Callable[[str], None] = print,
    ) -> None:
        params = Params(
            capture=sp.capture,
            rounds=0,
            round_s=sp.duration_s,
            writers=1,
            readers=sp.readers,
            ids=sp.hot_rows,
            initial_rows=sp.hot_rows,
            second_delete_ms=0 if sp.config == "none" else None,
            slow_read_share=1.0,
            slow_read_ms=sp.slow_ms,
            seed=sp.seed,
            redis_save=False,  # no fault: Redis is left as it is
            count_stale_sets=True,
        )
        super().__init__(params, pg=pg, rd=rd, dsn=dsn, workdir=workdir, say=say)
        if sp.config not in CONFIGS:
            raise ValueError(f"no such configuration: {sp.config!r} (one of {CONFIGS})")
        self.sp = sp
        self.writing_s = 0.0
        self._leases = sp.config == "leases"

    # --- the app: a paced writer, cache-aside readers ------------------------------------------

    def _writer(self, rng: random.Random, stats: Stats) -> None:
        doubts: list[InDoubt] = []
        period = 1 / self.sp.writes_per_s
        next_at = time.monotonic()

        def step(conn: psycopg.Connection[Any]) -> None:
            nonlocal next_at
            self._resolve(conn, doubts)
            self._update(conn, rng, stats, doubts)
            # Paced: a write every `period`, catching up at most one after a slow one.
            next_at = max(next_at + period, time.monotonic() - period)
            time.sleep(max(0.0, next_at - time.monotonic()))

        self._loop(self._stop_writers, 0.0, stats, step, (psycopg.Error,))

    def _update(
        self,
        conn: psycopg.Connection[Any],
        rng: random.Random,
        stats: Stats,
        doubts: list[InDoubt],
    ) -> None:
        """One hot row's cached value changed, in a transaction of its own."""
        i = rng.randint(1, self.sp.hot_rows)
        changed: list[tuple[Any, ...]] = []
        committing: tuple[str, int, float] | None = None
        try:
            with conn.transaction():
                changed = conn.execute(UPDATE_ROW, [f"n{rng.randint(0, 999)}", i]).fetchall()
                xid, order = self.position(conn)
                committing = (xid, order, time.monotonic())  # the COMMIT follows
        except psycopg.Error:
            if committing is not None:
                doubts.append((*committing, changed))
            raise
        self.committed(committing, changed, stats)

    def _reader(self, rng: random.Random, stats: Stats) -> None:
        # No retries inside redis-py: a SET that failed is never sent again later.
        r = self.redis_client(retry=Retry(NoBackoff(), 0))
        leases = LeaseCache(r) if self._leases else None
        try:
            self._loop(
                self._stop_readers,
                self.p.reader_pause_s,
                stats,
                lambda conn: self._hot_read(conn, r=r, leases=leases, rng=rng, stats=stats),
                (psycopg.Error, redis.RedisError),
            )
        finally:
            r.close()

    def _hot_read(
        self,
        conn: psycopg.Connection[Any],
        *,
        r: redis.Redis,
        leases: LeaseCache | None,
        rng: random.Random,
        stats: Stats,
    ) -> None:
        i = rng.randint(1, self.sp.hot_rows)
        pause = rng.uniform(0, self.sp.slow_ms / 1000)
        if leases is None:
            self._cache_aside(r, conn, stats, f"user:{i}", ("id", i), slow=pause)
        else:
            self._lease_read(leases, conn, stats, i, pause)

    def _lease_read(
        self,
        leases: LeaseCache,
        conn: psycopg.Connection[Any],
        stats: Stats,
        i: int,
        pause: float,
    ) -> None:
        key = f"user:{i}"
        loaded: list[float] = []  # when the loader read the row, and when it returned

        def loader() -> str:
            loaded.append(time.monotonic())
            value = render(conn.execute(SELECT_ROW, [i]).fetchone())
            time.sleep(pause)  # the app building the value: a slow reader
            loaded.append(time.monotonic())
            return value

        stats.reads += 1
        asked_at = time.monotonic()
        got = leases.get_or_fill(key, loader, ttl=None)
        value = got.decode() if isinstance(got, bytes) else str(got)
        if not loaded:  # a hit: what Redis held
            stats.hits += 1
            self.observed.hit(key, value, asked_at)
        elif len(loaded) == 2:  # a miss: a fill, written if the lease held
            self.filled(stats, key, value, loaded[0], loaded[1])

    # --- the end ---------------------------------------------------------------------------------

    def refill(self) -> None:
        """The readers, the writer stopped, refill the cache until every hot key holds a
        value: the end's check then covers each (a slow reader takes a while). Or for a
        while at most: a key left out is not stale, and the report says how many were
        cached."""
        deadline = time.monotonic() + REFILL_S + 3 * self.sp.slow_ms / 1000
        keys = [f"user:{i}" for i in range(1, self.sp.hot_rows + 1)]
        r = self.redis_client()
        try:
            while time.monotonic() < deadline:
                values = r.mget(keys)
                if all(v is not None and is_rendering(str(v)) for v in values):
                    break
                time.sleep(0.02)
        finally:
            r.close()

    def hot_keys(self) -> tuple[int, list[str], list[str]]:
        """Every hot key in Redis against its row: how many hold a value, the stale ones,
        and those that hold something a reader never caches (a lease left behind)."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT id, email, name, version FROM users WHERE id <= %s", [self.sp.hot_rows]
            ).fetchall()
        by_id = {row[0]: row for row in rows}
        r = self.redis_client()
        cached, stale, other = 0, [], []
        try:
            for i in range(1, self.sp.hot_rows + 1):
                key = f"user:{i}"
                value = r.get(key)
                if value is None:
                    continue
                if not is_rendering(str(value)):
                    other.append(key)
                    continue
                cached += 1
                if value != render(by_id.get(i)):
                    stale.append(key)
        finally:
            r.close()
        return cached, stale, other

    def measure(self) -> StalenessResult:
        self.setup()
        self.start_app()
        began = time.monotonic()
        try:
            time.sleep(self.sp.duration_s)  # the workload
            self.writing_s = time.monotonic() - began  # the writer stops now
            self.quiesce()
        finally:
            self.stop_all()
        stats = self.totals()
        out = StalenessResult(
            self.p.capture, self.sp.config, self.sp.slow_ms, self.second_delete_ms, self.sp.hot_rows
        )
        out.writes, out.reads, out.hits, out.sets = (
            stats.writes,
            stats.reads,
            stats.hits,
            stats.sets,
        )
        out.errors, out.slow_sets = stats.errors, stats.slow_sets
        out.max_gap_ms = stats.max_gap_s * 1000
        out.keys_cached, out.keys_stale, out.not_values = self.hot_keys()
        out.stale_races = self.races(out.keys_stale)
        out.stale_reads = self.observed.summary([])  # no fault: every episode is quiet
        out.listener = self.report.listener
        out.seconds = time.monotonic() - self.started
        out.writing_s = self.writing_s
        return out


# --- `make chaos CHAOS_ARGS=--staleness` -------------------------------------------------------


def _ms(d: Durations) -> str:
    if not d.count:
        return "0"
    return f"{d.count}: {d.p50_ms:.0f} / {d.p99_ms:.0f} / {d.max_ms:.0f} ms"


HEADER = [
    "mode",
    "configuration",
    "readers",
    "keys stale at the end",
    "hits",
    "stale hits",
    "still wrong 50 ms later",
    "races: n, p50 / p99 / max",
    "late deletes: n, p50 / p99 / max",
    "longest SELECT-to-SET gap",
    "writes/s",
]


def table(results: Sequence[StalenessResult]) -> list[str]:
    """One row per run, as a Markdown table."""
    rows = [HEADER, ["---"] * len(HEADER)]
    for r in results:
        rows.append(
            [
                r.capture,
                r.label,
                f"<= {r.slow_ms:.0f} ms",
                f"{len(r.keys_stale)} of {r.hot_rows} ({r.keys_cached} cached)",
                str(r.hits),
                f"{r.stale_pct:.2f} %",
                f"{r.still_wrong_pct:.2f} %",
                _ms(r.stale_reads.quiet_races),
                _ms(r.stale_reads.quiet_late),
                f"{r.max_gap_ms:.0f} ms",
                f"{r.writes / r.writing_s:.0f}" if r.writing_s else "-",
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(HEADER))]
    return [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]


@contextmanager
def _database(servers: Servers, tmp: Path) -> Iterator[str]:
    """A new database on the run's servers (dropped after, its slot too), Redis flushed."""
    for env in make_env(servers, tmp):
        yield env.dsn


def run_mode(
    capture: str,
    *,
    configs: Sequence[str],
    slow: Sequence[float],
    duration_s: float,
    seed: int,
    say: Callable[[str], None],
) -> list[StalenessResult]:
    """Every configuration and reader slowness of one capture mode, each on a database
    of its own, on servers of the mode's own."""
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="cdc-invalidator-staleness-"))
    try:
        with own_servers() as (pg, rd):
            servers = Servers(pg.dsn, rd.url, pg, rd)
            for config in configs:
                for slow_ms in slow:
                    tmp = Path(tempfile.mkdtemp(dir=workdir))
                    sp = StalenessParams(capture, config, slow_ms, duration_s, seed=seed)
                    with _database(servers, tmp) as dsn:
                        run = Staleness(sp, pg=pg, rd=rd, dsn=dsn, workdir=tmp, say=say)
                        result = run.measure()
                        for key in result.keys_stale[:3]:
                            for line in run.explain(key)[-6:]:
                                say(line)
                    say("\n".join(result.lines()))
                    results.append(result)
    finally:
        with suppress(OSError):
            shutil.rmtree(workdir)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos --staleness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--capture", choices=["trigger", "logical", "both"], default="both")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"some of {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--slow-ms", default="100,1000", help="the readers' longest pauses between SELECT and SET"
    )
    parser.add_argument("--duration-s", type=float, default=15.0, help="per run")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: no such configuration {unknown[0]!r} (one of {CONFIGS})")
    try:
        slow = [float(v) for v in args.slow_ms.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--slow-ms: not a list of numbers: {args.slow_ms!r}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    modes = ["trigger", "logical"] if args.capture == "both" else [args.capture]
    results = []
    for mode in modes:
        print(
            f"staleness: {mode} mode, {', '.join(configs)}, readers up to"
            f" {', '.join(f'{s:.0f}' for s in slow)} ms, {args.duration_s} s each, seed {seed}",
            flush=True,
        )
        results += run_mode(
            mode,
            configs=configs,
            slow=slow,
            duration_s=args.duration_s,
            seed=seed,
            say=lambda line: print(line, flush=True),
        )
    print()
    print("\n".join(table(results)))
    print()
    failures = [f for r in results for f in r.failures()]
    for line in failures:
        print(f"FAIL: {line}")
    if failures:
        return 1
    print("PASS: within the bounds of issue 15")
    return 0
