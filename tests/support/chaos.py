"""Chaos: an app's cache-aside readers, writers and injected faults, then every cached key
compared with the database. Used by tests/test_chaos.py (a short run in `make test`) and
by `make chaos` (`python -m tests.chaos`, a long run that prints a table).

The world: `users(id, email, name, version)`, keys `user:{id}` and `user:email:{email}`.
A cached value is the JSON of the row the reader found (`null` when there was none, a
negative cache entry), so a key is stale when its value differs from what the row's
current data renders: the row changed or went, or (`null`) a row appeared since.

- Writers (threads, a connection each, reconnecting after any failure): random
  single-row UPDATEs (sometimes changing the email), INSERTs, DELETEs, multi-row
  statements, transactions of several statements, and rolled-back ones. Every write
  takes a new `version` from a sequence, so no two row states render alike.
- Readers (threads): cache-aside, as an app does it: GET; on a miss SELECT the row and
  plain `SET` it (no TTL: a stale key would stay forever). On any PostgreSQL or Redis
  error they drop what they read and start over; the SET is never retried with an old
  read (redis-py retries are off for them). A share of the reads wait up to 100 ms
  between SELECT and SET (an app building the value, a GC pause), so that the stale-set
  race happens for real: with `--second-delete-ms 0` a run ends with stale keys.
- The listener: a real `python -m cdc_invalidator run` process with `second_delete_ms`
  on; killed and started again by the faults.
- Faults, one per round, every kind in turn (shuffled per cycle): SIGKILL the listener
  (and start a new one), Redis SAVE then SIGKILL + restart on that dump half a round
  later (the deletes in between are lost: the listener's replay must redo them),
  `pg_terminate_backend` of every session (listener's and app's), and a fast PostgreSQL
  restart. After each fault the injector waits, on the listener's own log lines, until
  it has recovered (a new listener started, `replay_done`, `postgres_available`).
- Probe rows, a set per round, that nobody else touches: cached just before the fault,
  changed once at its worst moment (while the listener is dead; after the SAVE; just
  before the backends are terminated or the server restarts), never written again. The
  writers' rows heal a lost invalidation at their next write; the probes cannot, so the
  final check sees every fault's window (with `--replay-window 0s` it reports them).

The end, driven by events and not by sleeping: writers stop; readers go on for a moment
(refilling the cache with the final data), then stop; one marker write is made and the
listener is awaited until it acknowledged it (trigger mode: `status` backlog 0; logical
mode: the slot's `confirmed_flush_lsn` past the marker); then the listener is stopped
with SIGTERM, which performs the second deletes it still owes. Then every key in Redis is
compared with the database.

The race no invalidator can close: a reader SELECTs a row before a writer commits, and
its SET lands after the listener's first delete. `second_delete_ms` deletes the key again
that much later, so the race only leaves a stale key when the reader's SELECT-to-SET gap
is longer than `second_delete_ms`. The readers measure that gap on every SET and the
report gives the longest, and how many exceeded `second_delete_ms` (a stale key then may
be the accepted race, not a bug). Most reads have a gap under a millisecond, the slow
ones at most ~100 ms plus scheduling, and the listener deletes about a millisecond after
the commit: 300 ms leaves a margin of about three. A second delete still owed when the
listener is SIGKILLed is redone by the next listener (from the replay history); the
writers' rows are written about once a second, so the final check alone would rarely see
a failure there: tests/test_chaos.py has a deterministic test for it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

from cdc_invalidator.cli import main as cli_main
from cdc_invalidator.status import read_status
from tests.support.config import write_config
from tests.support.env import FAST_PG
from tests.support.listener import ListenerProcess
from tests.support.servers import PostgresServer, RedisServer
from tests.support.waits import wait_until

TEMPLATES = ["user:{id}", "user:email:{email}"]
FAULTS = ("kill_listener", "redis_restore", "terminate_backends", "pg_restart")
SLOT = "cdc_invalidator"  # the default slot_name
LISTENER_APP = "cdc-invalidator"  # the listener's default application_name
APP_NAME = "chaos-app"  # the readers' and writers' sessions
EMAILS_PER_ID = 4  # an id's emails come from a small pool, so an email comes back
HEAL_TIMEOUT_S = 30.0
# Probe rows, one set per round, far from the writers' ids: cached by the injector just
# before its fault, changed once at the fault's worst moment, never written again. A
# later write cannot hide a lost invalidation of theirs: the final check sees it.
PROBE_BASE = 100_000
PROBES = 12  # per round: rows 0-5 updated (even ones get a new email), 6-7 deleted,
PROBES_EXISTING = 8  # 8-11 inserted (absent until then: cached as `null`)


def render(row: tuple[Any, ...] | None) -> str:
    """What a reader caches for a row (or for no row)."""
    return json.dumps(None if row is None else list(row))


def email_of(i: int, k: int) -> str:
    return f"u{i}.{k}@x"


def id_of_key(key: str) -> int:
    """user:42 and user:email:u42.3@x both belong to id 42."""
    tail = key.removeprefix("user:email:u") if key.startswith("user:email:") else key[5:]
    return int(tail.split(".")[0])


@dataclass
class Params:
    capture: str = "trigger"
    rounds: int = 4
    round_s: float = 2.0
    writers: int = 3
    readers: int = 4
    ids: int = 200
    second_delete_ms: int = 300
    writer_pause_s: float = 0.01
    reader_pause_s: float = 0.001
    # A share of the reads work a while between SELECT and SET (an app building the
    # value, a GC pause): the stale-set race happens for real and second deletes must
    # undo it. Kept well below second_delete_ms.
    slow_read_share: float = 0.2
    slow_read_ms: float = 100.0
    seed: int = 0
    replay_window: str = "auto"  # "0s": replay off, to show that the check would notice
    faults: tuple[str, ...] = FAULTS


@dataclass
class Stats:
    """One thread's counters (summed at the end: no lock on the hot path)."""

    reads: int = 0
    hits: int = 0
    sets: int = 0
    writes: int = 0
    rollbacks: int = 0
    errors: int = 0
    max_gap_s: float = 0.0
    slow_sets: int = 0  # SELECT-to-SET gap longer than second_delete_ms


@dataclass
class Report:
    capture: str
    rounds: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    hits: int = 0
    sets: int = 0
    writes: int = 0
    rollbacks: int = 0
    errors: int = 0
    max_gap_ms: float = 0.0
    slow_sets: int = 0
    keys_checked: int = 0
    probe_keys: int = 0  # cached before a fault, their rows changed during it
    rows: int = 0
    stale: list[str] = field(default_factory=list)
    listener: dict[str, int] = field(default_factory=dict)  # summed over listener runs
    seconds: float = 0.0

    def lines(self) -> list[str]:
        faults = ", ".join(f"{k} {self.faults[k]}" for k in FAULTS)
        return [
            f"capture:            {self.capture}",
            f"rounds:             {self.rounds} ({self.seconds:.0f} s)",
            f"faults:             {faults}",
            f"writes:             {self.writes} committed transactions"
            f" (+{self.rollbacks} rolled back)",
            f"reads:              {self.reads} ({self.hits} hits, {self.sets} SETs after a miss)",
            f"client errors:      {self.errors} (readers and writers, retried)",
            f"SELECT-to-SET gap:  max {self.max_gap_ms:.1f} ms,"
            f" {self.slow_sets} longer than second_delete_ms",
            f"listener:           {self.listener.get('events', 0)} events,"
            f" {self.listener.get('keys_deleted', 0)} keys deleted,"
            f" {self.listener.get('keys_deleted_again', 0)} deleted again by second deletes"
            f" (last run)",
            f"keys checked:       {self.keys_checked} (against {self.rows} rows);"
            f" {self.probe_keys} probe keys cached before a fault, changed during it",
            f"stale keys:         {len(self.stale)}",
        ]


class History:
    """The last things that happened to each id, to explain a stale key."""

    def __init__(self, started: float) -> None:
        self._started = started
        self._by_id: dict[int, deque[str]] = {}
        self._lock = threading.Lock()

    def note(self, i: int, what: str) -> None:
        line = f"{(time.monotonic() - self._started) * 1000:9.1f} ms {what}"
        with self._lock:
            self._by_id.setdefault(i, deque(maxlen=40)).append(line)

    def of(self, i: int) -> list[str]:
        with self._lock:
            return list(self._by_id.get(i, ()))


class Chaos:
    """One run against a PostgreSQL database and a Redis that it may restart and kill."""

    def __init__(
        self,
        params: Params,
        *,
        pg: PostgresServer,
        rd: RedisServer,
        dsn: str,
        workdir: Path,
        say: Callable[[str], None] = print,
    ) -> None:
        self.p = params
        self.pg = pg
        self.rd = rd
        self.dsn = dsn
        self.workdir = workdir
        self.say = say
        self.rng = random.Random(params.seed)
        self.started = time.monotonic()
        self.history = History(self.started)
        self.report = Report(params.capture)
        self._stop_writers = threading.Event()
        self._stop_readers = threading.Event()
        self._stats: list[Stats] = []
        self._threads: list[threading.Thread] = []
        self._listeners: list[ListenerProcess] = []
        self.config = workdir / "chaos.toml"

    # --- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        # RDB snapshots on, as a Redis that can come back older has: replay_window "auto"
        # derives the window from this rule (3600 s, more than a run lasts).
        if "--save" not in self.rd.args:
            self.rd.args = [*self.rd.args, "--save", "3600 1"]
            self.rd.restart()
        with self.connect() as conn:
            # The app's commits wait for the WAL flush, as in production (the test cluster
            # turns that off server-wide): otherwise logical decoding, which streams
            # flushed WAL only, sees a commit up to wal_writer_delay (200 ms) late, and
            # that delay hides the stale-set race this run is meant to provoke.
            dbname = conn.info.dbname
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = on").format(
                    sql.Identifier(dbname)
                )
            )
            conn.execute(
                "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE,"
                " name text NOT NULL, version bigint NOT NULL)"
            )
            conn.execute("CREATE SEQUENCE chaos_version")
            conn.execute(
                "INSERT INTO users SELECT i, 'u' || i || '.0@x', 'n' || i, nextval('chaos_version')"
                " FROM generate_series(1, %s) i",
                [self.p.ids * 3 // 4],
            )
            for n in range(self.p.rounds):
                first = PROBE_BASE + n * PROBES
                conn.execute(
                    "INSERT INTO users SELECT i, 'u' || i || '.0@x', 'probe',"
                    " nextval('chaos_version') FROM generate_series(%s::int, %s::int) i",
                    [first, first + PROBES_EXISTING - 1],
                )
        mode: dict[str, object] = {"capture": "logical"} if self.p.capture == "logical" else {}
        write_config(
            self.config,
            database_url=self.dsn,
            redis_url=self.rd.url,
            tables={"public.users": TEMPLATES},
            second_delete_ms=self.p.second_delete_ms,
            replay_history="1h",
            redis_check_interval_ms=200,
            replay_window=self.p.replay_window,
            **mode,
        )
        assert cli_main(["install", "--config", str(self.config)]) == 0, "install failed"
        self.start_listener()

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=2, **kwargs)

    def redis_client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.rd.port,
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=2,
            **kwargs,
        )

    @property
    def listener(self) -> ListenerProcess:
        return self._listeners[-1]

    def start_listener(self) -> None:
        log = self.workdir / f"listener-{len(self._listeners)}.log"
        listener = ListenerProcess(self.config, log)
        self._listeners.append(listener)
        listener.start()

    # --- the app ----------------------------------------------------------------------------

    def _thread(self, name: str, target: Callable[[random.Random, Stats], None]) -> None:
        stats = Stats()
        self._stats.append(stats)
        rng = random.Random(self.rng.random())
        thread = threading.Thread(target=target, args=(rng, stats), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def start_app(self) -> None:
        for n in range(self.p.writers):
            self._thread(f"writer-{n}", self._writer)
        for n in range(self.p.readers):
            self._thread(f"reader-{n}", self._reader)

    def _loop(
        self,
        stop: threading.Event,
        pause_s: float,
        stats: Stats,
        step: Callable[[psycopg.Connection[Any]], object],
        errors: tuple[type[Exception], ...],
    ) -> None:
        """`step` until `stop`, on a connection of the app's own: after any of `errors`,
        count it, drop what was read and reconnect."""
        conn: psycopg.Connection[Any] | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self.connect(application_name=APP_NAME)
                step(conn)
            except errors:
                stats.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
            time.sleep(pause_s)
        if conn is not None:
            conn.close()

    def _writer(self, rng: random.Random, stats: Stats) -> None:
        self._loop(
            self._stop_writers,
            self.p.writer_pause_s,
            stats,
            lambda conn: self._write(conn, rng, stats),
            (psycopg.Error,),
        )

    def _write(self, conn: psycopg.Connection[Any], rng: random.Random, stats: Stats) -> None:
        i = rng.randint(1, self.p.ids)
        roll = rng.random()
        changed: list[tuple[Any, ...]] = []
        rollback = roll >= 0.95

        def run(query: str, params: list[Any]) -> None:
            changed.extend(conn.execute(query.encode(), params).fetchall())

        update = (
            "UPDATE users SET version = nextval('chaos_version'), name = %s,"
            " email = CASE WHEN %s THEN 'u' || id || '.' || %s || '@x' ELSE email END"
            " WHERE id BETWEEN %s AND %s RETURNING 'update', id, email, version"
        )
        insert = (
            "INSERT INTO users VALUES (%s, %s, %s, nextval('chaos_version'))"
            " ON CONFLICT DO NOTHING RETURNING 'insert', id, email, version"
        )
        delete = "DELETE FROM users WHERE id = %s RETURNING 'delete', id, email, version"
        name = f"n{rng.randint(0, 999)}"
        new_email = email_of(i, rng.randrange(EMAILS_PER_ID))
        try:
            with conn.transaction():
                if roll < 0.45 or rollback:
                    run(update, [name, rng.random() < 0.3, rng.randrange(EMAILS_PER_ID), i, i])
                elif roll < 0.60:
                    run(insert, [i, new_email, name])
                elif roll < 0.72:
                    run(delete, [i])
                elif roll < 0.85:  # one statement, several rows
                    run(update, [name, rng.random() < 0.3, rng.randrange(EMAILS_PER_ID), i, i + 5])
                else:  # several statements, one transaction
                    run(update, [name, True, rng.randrange(EMAILS_PER_ID), i, i])
                    j = rng.randint(1, self.p.ids)
                    run(delete, [j])
                    run(insert, [j, email_of(j, rng.randrange(EMAILS_PER_ID)), name])
                if rollback:
                    raise _Rollback  # noqa: TRY301 - the way to roll back a `transaction()`
        except _Rollback:
            stats.rollbacks += 1
            return
        stats.writes += 1
        for op, row_id, email, version in changed:
            self.history.note(row_id, f"{op} committed: email={email} version={version}")

    def _reader(self, rng: random.Random, stats: Stats) -> None:
        # No retries inside redis-py: a SET that failed is dropped, never sent again later
        # with what was read before the failure.
        r = self.redis_client(retry=Retry(NoBackoff(), 0))
        try:
            self._loop(
                self._stop_readers,
                self.p.reader_pause_s,
                stats,
                lambda conn: self._read(r, conn, rng, stats),
                (psycopg.Error, redis.RedisError),
            )
        finally:
            r.close()

    def _read(
        self, r: redis.Redis, conn: psycopg.Connection[Any], rng: random.Random, stats: Stats
    ) -> None:
        i = rng.randint(1, self.p.ids)
        slow = 0.0
        if rng.random() < self.p.slow_read_share:
            slow = rng.uniform(0, self.p.slow_read_ms / 1000)
        value = self._cache_aside(r, conn, stats, f"user:{i}", ("id", i), slow=slow)
        roll = rng.random()
        if roll < 0.4 and value != "null":  # the email of what we got
            email = str(json.loads(value)[1])
        elif roll < 0.7:  # an email that may or may not be there
            email = email_of(i, rng.randrange(EMAILS_PER_ID))
        else:
            return
        self._cache_aside(r, conn, stats, f"user:email:{email}", ("email", email), slow=slow)

    def _cache_aside(
        self,
        r: redis.Redis,
        conn: psycopg.Connection[Any],
        stats: Stats,
        key: str,
        lookup: tuple[str, object],
        *,
        slow: float,
    ) -> str:
        stats.reads += 1
        cached = r.get(key)
        if cached is not None:
            stats.hits += 1
            return str(cached)
        read_at = time.monotonic()
        column, arg = lookup
        query = f"SELECT id, email, name, version FROM users WHERE {column} = %s"
        value = render(conn.execute(query.encode(), [arg]).fetchone())
        if slow:
            time.sleep(slow)
        r.set(key, value)
        gap_s = time.monotonic() - read_at
        stats.sets += 1
        stats.max_gap_s = max(stats.max_gap_s, gap_s)
        if gap_s * 1000 > self.p.second_delete_ms > 0:
            stats.slow_sets += 1
        self.history.note(id_of_key(key), f"SET {key} = {value} (gap {gap_s * 1000:.1f} ms)")
        return value

    # --- faults -------------------------------------------------------------------------------

    def _count(self, event: str) -> int:
        return len(self.listener.logged(event))

    def _healed(self, event: str, before: int, what: str) -> None:
        wait_until(lambda: self._count(event) > before, timeout_s=HEAL_TIMEOUT_S, what=what)

    def cache_probes(self, n: int) -> None:
        """What an app would have cached for round n's probe rows."""
        ids = list(range(PROBE_BASE + n * PROBES, PROBE_BASE + (n + 1) * PROBES))
        with self.connect() as conn:
            found = conn.execute(
                "SELECT id, email, name, version FROM users WHERE id = ANY(%s)", [ids]
            ).fetchall()
        rows = {row[0]: row for row in found}
        r = self.redis_client()
        for i in ids:
            value = render(rows.get(i))
            r.mset({f"user:{i}": value, f"user:email:{email_of(i, 0)}": value})
            self.history.note(i, f"probe cached: {value}")
        r.close()

    def write_probes(self, n: int) -> None:
        """Round n's probe rows changed, in one transaction, at the fault's worst moment."""
        first = PROBE_BASE + n * PROBES
        with self.connect() as conn, conn.transaction():
            conn.execute(
                "UPDATE users SET version = nextval('chaos_version'), name = 'probed',"
                " email = CASE WHEN id %% 2 = 0 THEN 'u' || id || '.1@x' ELSE email END"
                " WHERE id BETWEEN %s AND %s",
                [first, first + 5],
            )
            conn.execute("DELETE FROM users WHERE id BETWEEN %s AND %s", [first + 6, first + 7])
            conn.execute(
                "INSERT INTO users SELECT i, 'u' || i || '.0@x', 'probed',"
                " nextval('chaos_version') FROM generate_series(%s::int, %s::int) i",
                [first + PROBES_EXISTING, first + PROBES - 1],
            )
        for i in range(first, first + PROBES):
            self.history.note(i, "probe written")
        # Both keys of each row; the even updated rows' new email key was not cached.
        self.report.probe_keys += 2 * PROBES

    @staticmethod
    def probe_keys(n: int) -> list[str]:
        """Round n's probe keys as cached before its fault."""
        ids = range(PROBE_BASE + n * PROBES, PROBE_BASE + (n + 1) * PROBES)
        return [f"user:{i}" for i in ids] + [f"user:email:{email_of(i, 0)}" for i in ids]

    def probes_gone(self, n: int) -> bool:
        keys = self.probe_keys(n)
        r = self.redis_client()
        try:
            return r.exists(*keys) == 0
        finally:
            r.close()

    def inject(self, fault: str, half_round_s: float, n: int) -> None:
        """One fault (round n: its probes); returns once the listener has recovered."""
        self.cache_probes(n)
        if fault == "kill_listener":
            self.listener.kill()  # SIGKILL; the next listener redoes owed second deletes
            self.write_probes(n)  # while nobody listens
            time.sleep(self.rng.uniform(0, half_round_s))  # down a while: a backlog forms
            self.start_listener()
        elif fault == "redis_restore":
            self.redis_client().save()  # the snapshot; what is deleted after it will come back
            self.write_probes(n)
            # Deleted from the live server: deletes that the restart is about to lose.
            wait_until(lambda: self.probes_gone(n), what="the probes invalidated")
            time.sleep(half_round_s)
            # With replay off, only the listener's noticing can be awaited.
            event = "redis_changed" if self.p.replay_window == "0s" else "replay_done"
            before = self._count(event)
            self.rd.kill()
            self.rd.start()  # on the dump: stale keys are back until the replay
            self._healed(event, before, "the listener's replay")
        elif fault == "terminate_backends":
            before = self._count("postgres_available")
            self.write_probes(n)  # the listener may be busy with them when its session ends
            with self.connect() as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name IN (%s, %s) AND pid <> pg_backend_pid()",
                    [LISTENER_APP, APP_NAME],
                )
            self._healed("postgres_available", before, "the listener back on PostgreSQL")
        elif fault == "pg_restart":
            before = self._count("postgres_available")
            self.write_probes(n)  # committed just before the server goes down
            self.pg.restart("fast")
            self._healed("postgres_available", before, "the listener back on PostgreSQL")
        else:
            raise ValueError(fault)
        self.report.faults[fault] += 1

    def schedule(self) -> list[str]:
        """Every kind in turn, in a shuffled order per cycle."""
        out: list[str] = []
        while len(out) < self.p.rounds:
            cycle = list(self.p.faults)
            self.rng.shuffle(cycle)
            out += cycle
        return out[: self.p.rounds]

    # --- the end: quiet, caught up, compared ----------------------------------------------

    def quiesce(self) -> None:
        self._stop_writers.set()
        for thread in self._threads:
            if thread.name.startswith("writer"):
                thread.join(30)
        time.sleep(0.5)  # workload: readers refill the cache with the final data
        self._stop_readers.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        self.wait_caught_up()
        self.listener.signal(signal.SIGTERM)  # does the second deletes still owed
        assert self.listener.wait(30) == 0, "the listener did not exit cleanly"
        stopped = self.listener.logged("listener_stopped")
        self.report.listener = stopped[0] if stopped else {}

    def wait_caught_up(self) -> None:
        """A marker write, then wait until the listener acknowledged it: every change
        before it has had its keys deleted."""
        with self.connect() as conn:
            # Flushed at commit: the walsender streams flushed WAL only.
            conn.execute("SET synchronous_commit = on")
            with conn.transaction():
                # An upsert: a change to the table whether or not row 1 exists now.
                conn.execute(
                    "INSERT INTO users VALUES (1, %s, 'marker', nextval('chaos_version'))"
                    " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    [email_of(1, 0)],
                )
                row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        marker = str(row[0])
        self.history.note(1, "marker update committed")
        if self.p.capture == "logical":
            query = (
                "SELECT coalesce(confirmed_flush_lsn > %s::pg_lsn, false)"
                " FROM pg_replication_slots WHERE slot_name = %s"
            )

            def done() -> bool:
                with self.connect() as conn:
                    found = conn.execute(query, [marker, SLOT]).fetchone()
                return bool(found and found[0])
        else:

            def done() -> bool:
                with self.connect() as conn:
                    return read_status(conn).backlog == 0

        try:
            wait_until(done, timeout_s=60, what="the listener caught up")
        except AssertionError:
            with self.connect() as conn:
                slots = conn.execute("SELECT * FROM pg_replication_slots").fetchall()
            self.say(f"marker {marker}; slots {slots}")
            for line in self.listener.lines()[-15:]:
                self.say(json.dumps(line))
            raise

    def check(self) -> list[str]:
        """Every cached key against the database: the stale ones."""
        with self.connect() as conn:
            rows = conn.execute("SELECT id, email, name, version FROM users").fetchall()
        by_id = {row[0]: row for row in rows}
        by_email = {row[1]: row for row in rows}
        r = self.redis_client()
        stale, checked = [], 0
        for key in r.scan_iter("*", count=1000):
            value = r.get(key)
            if value is None:
                continue
            checked += 1
            if key.startswith("user:email:"):
                expected = render(by_email.get(key.removeprefix("user:email:")))
            elif key.startswith("user:"):
                expected = render(by_id.get(int(key.removeprefix("user:"))))
            else:
                expected = "<no such key expected>"
            if value != expected:
                stale.append(key)
        r.close()
        self.report.keys_checked = checked
        self.report.rows = len(rows)
        return sorted(stale)

    def explain(self, key: str) -> list[str]:
        value = self.redis_client().get(key)
        return [f"{key} = {value!r}", *("    " + line for line in self.history.of(id_of_key(key)))]

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> Report:
        self.setup()
        self.start_app()
        half = self.p.round_s / 2
        try:
            for n, fault in enumerate(self.schedule(), 1):
                time.sleep(half)  # workload without a fault
                began = time.monotonic()
                self.inject(fault, half, n - 1)
                self.report.rounds = n
                stats = self.totals()
                self.say(
                    f"[{self.p.capture}] round {n:3}/{self.p.rounds} {fault:<18}"
                    f" healed in {time.monotonic() - began:5.2f} s;"
                    f" so far {stats.writes} writes, {stats.reads} reads, {stats.errors} errors"
                )
            time.sleep(half)
            self.quiesce()
        finally:
            self._stop_writers.set()
            self._stop_readers.set()
            for listener in self._listeners:
                listener.kill()
        stats = self.totals()
        rep = self.report
        rep.reads, rep.hits, rep.sets = stats.reads, stats.hits, stats.sets
        rep.writes, rep.rollbacks = stats.writes, stats.rollbacks
        rep.errors, rep.slow_sets = stats.errors, stats.slow_sets
        rep.max_gap_ms = stats.max_gap_s * 1000
        rep.stale = self.check()
        rep.seconds = time.monotonic() - self.started
        return rep

    def totals(self) -> Stats:
        out = Stats()
        for s in self._stats:
            out.reads += s.reads
            out.hits += s.hits
            out.sets += s.sets
            out.writes += s.writes
            out.rollbacks += s.rollbacks
            out.errors += s.errors
            out.slow_sets += s.slow_sets
            out.max_gap_s = max(out.max_gap_s, s.max_gap_s)
        return out


class _Rollback(Exception):
    """Raised inside a writer's transaction to roll it back."""


# --- `make chaos` -------------------------------------------------------------------------------


@contextmanager
def own_servers() -> Iterator[tuple[PostgresServer, RedisServer]]:
    # Durability off (FAST_PG): a fast restart is a clean shutdown, so nothing committed
    # is lost by it.
    with PostgresServer.create(FAST_PG) as pg, RedisServer.create() as rd:
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        yield pg, rd


def run_one(params: Params, say: Callable[[str], None]) -> Report:
    workdir = Path(tempfile.mkdtemp(prefix="cdc-invalidator-chaos-"))
    try:
        with own_servers() as (pg, rd):
            chaos = Chaos(params, pg=pg, rd=rd, dsn=pg.dsn("app"), workdir=workdir, say=say)
            report = chaos.run()
            for key in report.stale[:10]:
                for line in chaos.explain(key):
                    say(line)
    finally:
        with suppress(OSError):
            shutil.rmtree(workdir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--round-s", type=float, default=3.0)
    parser.add_argument("--capture", choices=["trigger", "logical", "both"], default="both")
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--ids", type=int, default=200)
    parser.add_argument("--second-delete-ms", type=int, default=300)
    parser.add_argument("--slow-read-ms", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--replay-window", default="auto", help='"0s" turns replay off: the check must fail'
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    modes = ["trigger", "logical"] if args.capture == "both" else [args.capture]
    reports = []
    for mode in modes:
        params = Params(
            capture=mode,
            rounds=args.rounds,
            round_s=args.round_s,
            writers=args.writers,
            readers=args.readers,
            ids=args.ids,
            second_delete_ms=args.second_delete_ms,
            slow_read_ms=args.slow_read_ms,
            replay_window=args.replay_window,
            seed=seed,
        )
        print(f"chaos: {mode} mode, {args.rounds} rounds of {args.round_s} s, seed {seed}")
        reports.append(run_one(params, lambda line: print(line, flush=True)))
    print()
    for report in reports:
        print("\n".join(report.lines()))
        print()
    stale = sum(len(r.stale) for r in reports)
    print("PASS: no stale keys" if not stale else f"FAIL: {stale} stale keys")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
