"""Chaos: an app's cache-aside readers, writers and injected faults against a real
listener; each fault's probe keys checked when its round ends, stale reads measured all
along, every cached key compared with the database at the end. Used by
tests/test_chaos.py (short runs and the controls, in `make test`) and by `make chaos`
(`python -m tests.chaos`, a long run that prints a table).

The world: `users(id, email, name, version)`, keys `user:{id}` and `user:email:{email}`.
A cached value is the JSON of the row the reader found (`null` when there was none, a
negative cache entry), so a key is stale when its value differs from what the row's
current data renders: the row changed or went, or (`null`) a row appeared since.

- Writers (threads, a connection each, reconnecting after any failure): random
  single-row UPDATEs (sometimes changing the email), INSERTs, DELETEs, multi-row
  statements, transactions of several statements, and rolled-back ones. Every write
  takes a new `version` from a sequence, so no two row states render alike. Each
  commit's row states are recorded with the time it returned (tests/support/stale_reads.py).
- Readers (threads): cache-aside, as an app does it: GET; on a miss SELECT the row and
  plain `SET` it (no TTL: a stale key would stay forever). On any PostgreSQL or Redis
  error they drop what they read and start over; the SET is never retried with an old
  read (redis-py retries are off for them). A share of the reads wait up to 100 ms
  between SELECT and SET (an app building the value, a GC pause), so that the stale-set
  race happens for real: with `--second-delete-ms 0` a run ends with stale keys. Every
  hit is compared with the committed states: stale reads, how many and how long
  (stale_reads.py says exactly what is counted).
- The listener: a real `python -m cdc_invalidator run` process (or, for a control, a
  mutant of it: tests/support/mutants.py) with `second_delete_ms` on; killed and
  started again by the faults.

Faults, one per round, every kind in turn (shuffled per cycle). Each round has its probe
rows, that nobody else touches: cached just before the fault, changed once, in one
transaction, at its worst moment, never written again (a writer's row heals a lost
invalidation at its next write; a probe cannot).

- `kill_listener`, `terminate_backends`, `pg_restart`: the probes are in flight when the
  fault lands. The writers are held, the listener is awaited until it acknowledged a
  marker write (and deleted its key), Redis writes are paused (CLIENT PAUSE WRITE), the
  probes commit, and the fault waits until the listener is blocked in an UNLINK (the
  probes' first delete; with second deletes on it may be a second delete due first).
  Then the listener's saved acknowledgement is read: if it covers the probes while their
  keys are still cached, the listener acknowledged before deleting (reported as such:
  with second deletes on, the next listener's redo of its predecessor's last seconds
  would hide that loss at a SIGKILL). Then: SIGKILL (Redis resumes; a new listener starts
  after a while, the writers making a backlog; the dead listener's Redis connections are
  closed, so its held UNLINK never runs), or the listener's Redis connections closed
  under its held UNLINK (it fails and never runs: `redis_unavailable`) and then every
  session terminated or a fast PostgreSQL restart: its batch must come again after the
  reconnect.
- `redis_restore`: SAVE, the probes written and invalidated, then Redis SIGKILLed and
  restarted on that dump half a round later (the deletes since the SAVE are lost: the
  listener's replay must redo them). Redis runs with `save 3600 1`, so with
  `replay_window = "auto"` each replay covers the whole run; that cannot hide an earlier
  round's loss because each round's probes are checked when it ends.
- `slot_loss` (logical mode only): the listener SIGKILLed, its replication slot dropped,
  the probes committed (no slot will ever stream them), a new listener started: it must
  find the slot gone and sweep every template. In trigger mode the queue is a table in
  the database: nothing like a slot can be lost without the data, so there is no such
  round.

A round ends when a marker written after the listener recovered is acknowledged (the
queue's saved snapshot covers its transaction; the slot's saved position is past it):
everything before it, the probes included, has been processed. The round's probe keys
are then compared with the database, before a later fault, replay or restart can delete
them. The fault's window for the stale-read figures is from the fault to that moment.

The end, driven by events and not by sleeping: writers stop; readers go on for a moment
(refilling the cache with the final data), then stop; a marker write is awaited until
the listener acknowledged it; the listener is stopped with SIGTERM, which performs the
second deletes it still owes. Then every key in Redis is compared with the database.

The race no invalidator can close: a reader SELECTs a row before a writer commits, and
its SET lands after the listener's first delete. `second_delete_ms` deletes the key again
that much later, so the race only leaves a stale key when the reader's SELECT-to-SET gap
is longer than `second_delete_ms`. The readers measure that gap on every SET and the
report gives the longest, and how many exceeded `second_delete_ms` (a stale key then may
be the accepted race, not a bug; SETs held by a fault's Redis pause count too, though
no row they read can change while the writers are held). Most reads have a gap under a
millisecond, the slow ones at most ~100 ms plus scheduling, and the listener deletes
about a millisecond after the commit: 300 ms leaves a margin of about three. A stale
key at the end is classified too: a race if a reader SET its value after the commit
that made it stale.
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
from collections.abc import Callable, Iterator, Sequence
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
from cdc_invalidator.settings import load_settings
from tests.support.config import write_config
from tests.support.env import FAST_PG
from tests.support.listener import ListenerProcess
from tests.support.servers import PostgresServer, RedisServer
from tests.support.stale_reads import StaleReads, StaleReadSummary, Truth, id_of_key
from tests.support.waits import wait_until

TEMPLATES = ["user:{id}", "user:email:{email}"]
FAULTS = ("kill_listener", "redis_restore", "terminate_backends", "pg_restart", "slot_loss")
LOGICAL_ONLY = ("slot_loss",)
# The faults that land while the probes are committed but not yet invalidated.
IN_FLIGHT = ("kill_listener", "terminate_backends", "pg_restart")
SLOT = "cdc_invalidator"  # the default slot_name
LISTENER_APP = "cdc-invalidator"  # the listener's default application_name
LISTENER_CLIENT = "cdc-invalidator"  # the listener's default Redis client name
APP_NAME = "chaos-app"  # the readers' and writers' sessions
EMAILS_PER_ID = 4  # an id's emails come from a small pool, so an email comes back
HEAL_TIMEOUT_S = 30.0
# Redis writes are paused this long at most (a safety net: they are resumed explicitly).
PAUSE_MS = 30_000
# Probe rows, one set per round, far from the writers' ids: cached by the injector just
# before its fault, changed once at the fault's worst moment, never written again. A
# later write cannot hide a lost invalidation of theirs: the round's check sees it.
PROBE_BASE = 100_000
PROBES = 12  # per round: rows 0-5 updated (even ones get a new email), 6-7 deleted,
PROBES_EXISTING = 8  # 8-11 inserted (absent until then: cached as `null`)
# The markers' row (nobody reads it): a write whose acknowledgement the injector awaits.
MARKER_ID = 99_999


def faults_for(capture: str) -> tuple[str, ...]:
    """Every fault kind that means something in this capture mode."""
    return tuple(f for f in FAULTS if capture == "logical" or f not in LOGICAL_ONLY)


def render(row: tuple[Any, ...] | None) -> str:
    """What a reader caches for a row (or for no row)."""
    return json.dumps(None if row is None else list(row))


def email_of(i: int, k: int) -> str:
    return f"u{i}.{k}@x"


@dataclass
class Params:
    capture: str = "trigger"
    rounds: int = 4
    round_s: float = 2.0
    writers: int = 3
    readers: int = 4
    ids: int = 200
    initial_rows: int | None = None  # rows 1..n at the start; None: three quarters of ids
    # None: not in the listener's config, which runs with its default
    second_delete_ms: int | None = 300
    writer_pause_s: float = 0.01
    reader_pause_s: float = 0.001
    # A share of the reads work a while between SELECT and SET (an app building the
    # value, a GC pause): the stale-set race happens for real and second deletes must
    # undo it. Kept well below second_delete_ms.
    slow_read_share: float = 0.2
    slow_read_ms: float = 100.0
    seed: int = 0
    replay_window: str = "auto"  # "0s": replay off, to show that the check would notice
    faults: tuple[str, ...] | None = None  # None: every kind of the capture mode
    mutant: str | None = None  # a broken listener (tests/support/mutants.py), for controls
    # Redis restarted with `save 3600 1` first (the restore fault needs snapshots on; a
    # run without faults may leave a shared Redis as it is).
    redis_save: bool = True
    # Each reader's SET compared with the committed states (stale_reads.StaleReads.set):
    # the staleness runs count the race's stale SETs. Off in the fault runs, which stay as
    # they were: it adds work under the truth's lock to every SET, beside the injector's
    # timing-sensitive steps.
    count_stale_sets: bool = False


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
class RoundCheck:
    """A round's probes, checked when it ended."""

    round: int
    fault: str
    stale: list[str] = field(default_factory=list)  # probe keys stale at the round's end
    # Probe keys still cached while the listener's saved acknowledgement already covered
    # their change (in-flight faults: Redis writes paused): acknowledged before deleted.
    acked_undeleted: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.stale or self.acked_undeleted)

    def line(self) -> str:
        out = f"round {self.round} {self.fault}:"
        if self.acked_undeleted:
            out += f" acknowledged before deleted: {', '.join(self.acked_undeleted)};"
        if self.stale:
            out += f" stale probe keys: {', '.join(self.stale)}"
        return out


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
    rounds_checked: list[RoundCheck] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # at the end
    stale_races: list[str] = field(default_factory=list)  # of those: SET after the change
    stale_reads: StaleReadSummary = field(default_factory=StaleReadSummary)
    listener: dict[str, int] = field(default_factory=dict)  # the last listener's counters
    seconds: float = 0.0

    @property
    def failed_rounds(self) -> list[RoundCheck]:
        return [r for r in self.rounds_checked if r.failed]

    @property
    def passed(self) -> bool:
        return not self.stale and not self.failed_rounds

    def lines(self) -> list[str]:
        faults = ", ".join(f"{k} {self.faults[k]}" for k in FAULTS if k in self.faults)
        sr = self.stale_reads
        return [
            f"capture:            {self.capture}",
            f"rounds:             {self.rounds} ({self.seconds:.0f} s)",
            f"faults:             {faults or 'none'}",
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
            f"stale reads:        {sr.stale_reads} of {sr.compared} cache hits compared",
            f"  quiet, races:     {sr.quiet_races}",
            f"  quiet, late:      {sr.quiet_late}",
            f"  in faults, races: {sr.fault_races}",
            f"  in faults, late:  {sr.fault_late}",
            f"probe keys:         {self.probe_keys} (cached before a fault, changed during it);"
            f" rounds with stale or early-acknowledged probes: {len(self.failed_rounds)}",
            f"keys checked:       {self.keys_checked} (against {self.rows} rows) at the end",
            f"stale keys:         {len(self.stale)} at the end"
            f" ({len(self.stale_races)} SET by a reader after the change)",
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


class Gate:
    """Lets the writers through one transaction at a time, or holds them all (each
    finishes the transaction it is in) while a fault is set up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._inside = 0

    @contextmanager
    def passing(self) -> Iterator[None]:
        with self._cond:
            while self._held:
                self._cond.wait()
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._cond:
            self._held = True
            while self._inside:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


# A writer's transaction whose COMMIT failed: xid, WAL position, when the COMMIT was
# sent, its rows.
InDoubt = tuple[str, int, float, list[tuple[Any, ...]]]

# What the injector awaits the acknowledgement of: the transaction's xid8 (trigger mode)
# and the WAL position inside it, before its commit (logical mode).
Token = tuple[str, str]


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
        self.faults = params.faults if params.faults is not None else faults_for(params.capture)
        self.pg = pg
        self.rd = rd
        self.dsn = dsn
        self.workdir = workdir
        self.say = say
        self.rng = random.Random(params.seed)
        self.started = time.monotonic()
        self.history = History(self.started)
        self.truth = Truth()
        self._marker_key = f"user:{MARKER_ID}"  # mark() sets the one its write must delete
        self.observed = StaleReads(self.truth)
        self.report = Report(params.capture)
        self._stop_writers = threading.Event()
        self._stop_readers = threading.Event()
        self._gate = Gate()
        self._stats: list[Stats] = []
        self._threads: list[threading.Thread] = []
        self._listeners: list[ListenerProcess] = []
        self._fault_windows: list[tuple[float, float]] = []
        self.config = workdir / "chaos.toml"
        # What the listener runs with, read from its config once written (setup).
        self.second_delete_ms = params.second_delete_ms or 0

    # --- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        # RDB snapshots on, as a Redis that can come back older has: replay_window "auto"
        # derives the window from this rule (3600 s, more than a run lasts).
        if self.p.redis_save and "--save" not in self.rd.args:
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
                [self.p.ids * 3 // 4 if self.p.initial_rows is None else self.p.initial_rows],
            )
            for n in range(self.p.rounds):
                first = PROBE_BASE + n * PROBES
                conn.execute(
                    "INSERT INTO users SELECT i, 'u' || i || '.0@x', 'probe',"
                    " nextval('chaos_version') FROM generate_series(%s::int, %s::int) i",
                    [first, first + PROBES_EXISTING - 1],
                )
            rows = conn.execute("SELECT 'insert', id, email, version FROM users").fetchall()
        self.truth.commit(0, 0.0, 0.0, rows)
        extra: dict[str, object] = {"capture": "logical"} if self.p.capture == "logical" else {}
        if self.p.second_delete_ms is not None:
            extra["second_delete_ms"] = self.p.second_delete_ms
        write_config(
            self.config,
            database_url=self.dsn,
            redis_url=self.rd.url,
            tables={"public.users": TEMPLATES},
            replay_history="1h",
            redis_check_interval_ms=200,
            replay_window=self.p.replay_window,
            **extra,
        )
        self.second_delete_ms = load_settings(self.config).second_delete_ms
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
        command = ["-m", "cdc_invalidator"]
        if self.p.mutant:
            command = ["-m", "tests.support.mutants", self.p.mutant]
        listener = ListenerProcess(self.config, log, command=command)
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
        doubts: list[InDoubt] = []  # COMMITs that failed: they may have happened

        def step(conn: psycopg.Connection[Any]) -> None:
            with self._gate.passing():
                self._resolve(conn, doubts)
                self._write(conn, rng, stats, doubts)

        self._loop(self._stop_writers, self.p.writer_pause_s, stats, step, (psycopg.Error,))

    def _resolve(self, conn: psycopg.Connection[Any], doubts: list[InDoubt]) -> None:
        """A COMMIT that failed (the server went away) may have happened: the ones that
        did are recorded now (from now: stale reads before are not counted)."""
        while doubts:
            xid, order, began, changed = doubts[0]
            row = conn.execute("SELECT pg_xact_status(%s::xid8)", [xid]).fetchone()
            if row is not None and row[0] == "committed":
                self.truth.commit(order, began, time.monotonic(), changed)
            doubts.pop(0)

    def _write(
        self,
        conn: psycopg.Connection[Any],
        rng: random.Random,
        stats: Stats,
        doubts: list[InDoubt],
    ) -> None:
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
        committing: tuple[str, int, float] | None = None
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
                xid, order = self.position(conn)
                committing = (xid, order, time.monotonic())  # the COMMIT follows
        except _Rollback:
            stats.rollbacks += 1
            return
        except psycopg.Error:
            if committing is not None:
                doubts.append((*committing, changed))
            raise
        self.committed(committing, changed, stats)

    def committed(
        self, committing: tuple[str, int, float], changed: list[tuple[Any, ...]], stats: Stats
    ) -> None:
        """A write transaction's rows (op, id, email, version) as committed: the truth
        every read is compared with, and each row's history."""
        self.truth.commit(committing[1], committing[2], time.monotonic(), changed)
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
        asked_at = time.monotonic()
        cached = r.get(key)
        if cached is not None:
            stats.hits += 1
            self.observed.hit(key, str(cached), asked_at)
            return str(cached)
        read_at = time.monotonic()
        column, arg = lookup
        query = f"SELECT id, email, name, version FROM users WHERE {column} = %s"
        value = render(conn.execute(query.encode(), [arg]).fetchone())
        if slow:
            time.sleep(slow)
        sent = time.monotonic()
        r.set(key, value)
        self.filled(stats, key, value, read_at, sent)
        return value

    def filled(self, stats: Stats, key: str, value: str, read_at: float, sent: float) -> None:
        """A reader's SET of what it read at `read_at`, sent at `sent`, just returned."""
        set_at = time.monotonic()
        self.observed.set(key, value, set_at, sent if self.p.count_stale_sets else None)
        gap_s = set_at - read_at
        stats.sets += 1
        stats.max_gap_s = max(stats.max_gap_s, gap_s)
        if gap_s * 1000 > self.second_delete_ms > 0:
            stats.slow_sets += 1
        self.history.note(id_of_key(key), f"SET {key} = {value} (gap {gap_s * 1000:.1f} ms)")

    # --- acknowledgements -------------------------------------------------------------------

    def token(self, conn: psycopg.Connection[Any]) -> Token:
        """Inside a transaction, as its last statement: what acked() takes."""
        row = conn.execute(
            "SELECT pg_current_xact_id()::text, pg_current_wal_insert_lsn()::text"
        ).fetchone()
        assert row is not None
        return str(row[0]), str(row[1])

    @staticmethod
    def position(conn: psycopg.Connection[Any]) -> tuple[str, int]:
        """The transaction's id, and the WAL insert position as a number: past every
        commit this transaction waited for (stale_reads.Truth orders a row's states by
        it)."""
        row = conn.execute(
            "SELECT pg_current_xact_id()::text, (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8"
        ).fetchone()
        assert row is not None
        return str(row[0]), int(row[1])

    def acked(self, token: Token) -> bool:
        """Whether the listener's saved acknowledgement covers that transaction: the
        queue's saved snapshot sees it, or the slot's saved position is past it."""
        xid, lsn = token
        with self.connect() as conn:
            if self.p.capture == "logical":
                row = conn.execute(
                    "SELECT coalesce(acked_lsn > %s::pg_lsn, false)"
                    " FROM cdc_invalidator.slot_state_v1 WHERE slot_name = %s",
                    [lsn, SLOT],
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT pg_visible_in_snapshot(%s::xid8, snapshot)"
                    " FROM cdc_invalidator.listener_state_v1",
                    [xid],
                ).fetchone()
        return bool(row and row[0])

    def mark(self) -> Token:
        """A marker write: the marker row gets a new email each time, whose key is cached
        first, so that its delete can be seen. Only this write deletes that key: a
        transaction streamed again after a reconnect (an earlier marker's among them)
        deletes earlier emails' keys, and must not pass for this one."""
        with self.connect() as conn:
            row = conn.execute("SELECT nextval('chaos_version')").fetchone()
        assert row is not None
        version = int(row[0])
        self._marker_key = f"user:email:{email_of(MARKER_ID, version)}"
        r = self.redis_client()
        r.set(self._marker_key, "marker")
        r.close()
        with self.connect() as conn, conn.transaction():
            changed = conn.execute(
                "INSERT INTO users VALUES (%s, %s, 'marker', %s)"
                " ON CONFLICT (id) DO UPDATE SET email = excluded.email,"
                " version = excluded.version"
                " RETURNING 'update', id, email, version",
                [MARKER_ID, email_of(MARKER_ID, version), version],
            ).fetchall()
            token = self.token(conn)
            order, began = self.position(conn)[1], time.monotonic()
        self.truth.commit(order, began, time.monotonic(), changed)
        return token

    def marker_deleted(self) -> bool:
        r = self.redis_client()
        try:
            return not r.exists(self._marker_key)
        finally:
            r.close()

    def caught_up(self, what: str) -> None:
        """A marker write, then wait until the listener acknowledged it and deleted its
        key: every change before it has been processed."""
        marker = self.mark()
        try:
            wait_until(
                lambda: self.acked(marker) and self.marker_deleted(),
                timeout_s=HEAL_TIMEOUT_S,
                what=what,
            )
        except AssertionError:
            for line in self.listener.lines()[-15:]:
                self.say(json.dumps(line))
            raise

    @staticmethod
    def _blocked_unlinks(r: redis.Redis) -> list[dict[str, str]]:
        """The listener's Redis connections that wait in an UNLINK (writes paused)."""
        return [
            c
            for c in r.client_list()
            if c.get("name") == LISTENER_CLIENT
            and "b" in c.get("flags", "")
            and c.get("cmd") == "unlink"
        ]

    def kill_blocked_unlinks(self, r: redis.Redis) -> None:
        """Close them: the UNLINK they wait with is dropped, it never runs."""
        for client in self._blocked_unlinks(r):
            r.client_kill_filter(_id=client["id"])

    def listener_blocked(self) -> bool:
        r = self.redis_client()
        try:
            return bool(self._blocked_unlinks(r))
        finally:
            r.close()

    # --- faults -------------------------------------------------------------------------------

    def _count(self, event: str) -> int:
        return len(self.listener.logged(event))

    def _healed(self, event: str, before: int, what: str) -> None:
        wait_until(lambda: self._count(event) > before, timeout_s=HEAL_TIMEOUT_S, what=what)

    @staticmethod
    def probe_ids(n: int) -> range:
        return range(PROBE_BASE + n * PROBES, PROBE_BASE + (n + 1) * PROBES)

    def cache_probes(self, n: int) -> None:
        """What an app would have cached for round n's probe rows."""
        ids = list(self.probe_ids(n))
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

    def write_probes(self, n: int) -> Token:
        """Round n's probe rows changed, in one transaction, at the fault's worst moment."""
        first = PROBE_BASE + n * PROBES
        changed: list[tuple[Any, ...]] = []
        with self.connect() as conn, conn.transaction():
            changed += conn.execute(
                "UPDATE users SET version = nextval('chaos_version'), name = 'probed',"
                " email = CASE WHEN id %% 2 = 0 THEN 'u' || id || '.1@x' ELSE email END"
                " WHERE id BETWEEN %s AND %s RETURNING 'update', id, email, version",
                [first, first + 5],
            ).fetchall()
            changed += conn.execute(
                "DELETE FROM users WHERE id BETWEEN %s AND %s"
                " RETURNING 'delete', id, email, version",
                [first + 6, first + 7],
            ).fetchall()
            changed += conn.execute(
                "INSERT INTO users SELECT i, 'u' || i || '.0@x', 'probed',"
                " nextval('chaos_version') FROM generate_series(%s::int, %s::int) i"
                " RETURNING 'insert', id, email, version",
                [first + PROBES_EXISTING, first + PROBES - 1],
            ).fetchall()
            token = self.token(conn)
            order, began = self.position(conn)[1], time.monotonic()
        self.truth.commit(order, began, time.monotonic(), changed)
        for i in range(first, first + PROBES):
            self.history.note(i, "probe written")
        # Both keys of each row; the even updated rows' new email key was not cached.
        self.report.probe_keys += 2 * PROBES
        return token

    @staticmethod
    def probe_keys(n: int) -> list[str]:
        """Round n's probe keys as cached before its fault."""
        ids = Chaos.probe_ids(n)
        return [f"user:{i}" for i in ids] + [f"user:email:{email_of(i, 0)}" for i in ids]

    def cached_probe_keys(self, n: int) -> list[str]:
        r = self.redis_client()
        try:
            return [k for k in self.probe_keys(n) if r.exists(k)]
        finally:
            r.close()

    def probes_gone(self, n: int) -> bool:
        return not self.cached_probe_keys(n)

    def drop_slot(self) -> None:
        """The replication slot dropped (once its walsender has let go of it)."""

        def dropped() -> bool:
            with self.connect() as conn:
                try:
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE slot_name = %s",
                        [SLOT],
                    )
                except psycopg.errors.ObjectInUse:
                    return False
            return True

        wait_until(dropped, what="the slot dropped")

    def inject(self, fault: str, half_round_s: float, n: int) -> RoundCheck:
        """One fault (round n: its probes); returns once the listener has recovered."""
        check = RoundCheck(n + 1, fault)
        self.cache_probes(n)
        if fault in IN_FLIGHT:
            self._in_flight(fault, half_round_s, n, check)
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
        elif fault == "slot_loss":
            self.listener.kill()
            self.drop_slot()
            self.write_probes(n)  # committed while no slot exists: no stream carries them
            time.sleep(self.rng.uniform(0, half_round_s))
            self.start_listener()
            self._healed("slot_created", 0, "the listener on a new slot")
        else:
            raise ValueError(fault)
        self.report.faults[fault] += 1
        return check

    def _in_flight(self, fault: str, half_round_s: float, n: int, check: RoundCheck) -> None:
        """The probes committed but not invalidated when the fault lands: Redis writes
        paused, the listener blocked in its UNLINK."""
        pg_before = self._count("postgres_available")
        with self._gate.held():
            self.caught_up("the listener caught up before the fault")
            r = self.redis_client()
            r.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            try:
                token = self.write_probes(n)
                wait_until(self.listener_blocked, what="the listener blocked in an UNLINK")
                if self.acked(token):
                    check.acked_undeleted = self.cached_probe_keys(n)
                if fault == "kill_listener":
                    self.listener.kill()  # SIGKILL; the next listener redoes owed second deletes
                    # Its UNLINK, held by the pause, must never run.
                    self.kill_blocked_unlinks(r)
                else:
                    # The UNLINK fails: its connection is closed while it waits (and that
                    # of the sink's one retry), so it never runs, unlike one that merely
                    # timed out. The batch in hand must come again, after the PostgreSQL
                    # fault too.
                    redis_before = self._count("redis_unavailable")

                    def failed() -> bool:
                        self.kill_blocked_unlinks(r)
                        return self._count("redis_unavailable") > redis_before

                    wait_until(failed, HEAL_TIMEOUT_S, "the listener's UNLINK failed")
                    if fault == "terminate_backends":
                        with self.connect() as conn:
                            conn.execute(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE application_name IN (%s, %s)"
                                " AND pid <> pg_backend_pid()",
                                [LISTENER_APP, APP_NAME],
                            )
                    else:
                        self.pg.restart("fast")
            finally:
                r.execute_command("CLIENT", "UNPAUSE")
                r.close()
        if fault == "kill_listener":
            time.sleep(self.rng.uniform(0, half_round_s))  # down a while: a backlog forms
            self.start_listener()
        else:
            self._healed("postgres_available", pg_before, "the listener back on PostgreSQL")

    def check_round(self, check: RoundCheck, n: int) -> None:
        """The round's probe keys against the database, once a marker written after the
        recovery is acknowledged: before anything later can delete them."""
        self.caught_up(f"the listener caught up after round {check.round}")
        check.stale = self.check(self.probe_keys(n))
        self.report.rounds_checked.append(check)

    def schedule(self) -> list[str]:
        """Every kind in turn, in a shuffled order per cycle."""
        out: list[str] = []
        while len(out) < self.p.rounds:
            cycle = list(self.faults)
            self.rng.shuffle(cycle)
            out += cycle
        return out[: self.p.rounds]

    # --- the end: quiet, caught up, compared ----------------------------------------------

    def stop_all(self) -> None:
        """Whatever happened: the app's threads stopped and joined, the listeners killed.
        (A reader still inside a slow read, left running after a failed run, would set a
        key in the shared Redis after the next test's flush.)"""
        self._stop_writers.set()
        self._stop_readers.set()
        for thread in self._threads:
            thread.join(30)
        for listener in self._listeners:
            listener.kill()

    def quiesce(self) -> None:
        self._stop_writers.set()
        for thread in self._threads:
            if thread.name.startswith("writer"):
                thread.join(30)
        self.refill()
        self._stop_readers.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        self.caught_up("the listener caught up at the end")
        self.listener.signal(signal.SIGTERM)  # does the second deletes still owed
        assert self.listener.wait(30) == 0, "the listener did not exit cleanly"
        stopped = self.listener.logged("listener_stopped")
        self.report.listener = stopped[0] if stopped else {}

    def refill(self) -> None:
        """The readers, the writers stopped, refill the cache with the final data."""
        time.sleep(0.5)  # workload

    def check(self, keys: Sequence[str] | None = None) -> list[str]:
        """Every cached key (or these) against the database: the stale ones."""
        with self.connect() as conn:
            rows = conn.execute("SELECT id, email, name, version FROM users").fetchall()
        by_id = {row[0]: row for row in rows}
        by_email = {row[1]: row for row in rows}
        r = self.redis_client()
        stale, checked = [], 0
        for key in keys if keys is not None else r.scan_iter("*", count=1000):
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
        if keys is None:
            self.report.keys_checked = checked
            self.report.rows = len(rows)
        return sorted(stale)

    def races(self, stale: Sequence[str]) -> list[str]:
        """Of these stale keys, those whose value a reader SET after the commit that made
        it stale: the stale-set race."""
        r = self.redis_client()
        now, out = time.monotonic(), []
        for key in stale:
            value = r.get(key)
            if value is None:
                continue
            made = self.truth.stale_since(key, str(value), now)
            if made is not None and self.observed.set_after(key, str(value), made.began):
                out.append(key)
        r.close()
        return out

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
                check = self.inject(fault, half, n - 1)
                healed = time.monotonic() - began
                self.check_round(check, n - 1)
                self._fault_windows.append((began, time.monotonic()))
                self.report.rounds = n
                stats = self.totals()
                self.say(
                    f"[{self.p.capture}] round {n:3}/{self.p.rounds} {fault:<18}"
                    f" healed in {healed:5.2f} s;"
                    f" so far {stats.writes} writes, {stats.reads} reads, {stats.errors} errors"
                    + (f"; FAILED {check.line()}" if check.failed else "")
                )
            time.sleep(half if self.p.rounds else self.p.round_s)
            self.quiesce()
        finally:
            self.stop_all()
        stats = self.totals()
        rep = self.report
        rep.reads, rep.hits, rep.sets = stats.reads, stats.hits, stats.sets
        rep.writes, rep.rollbacks = stats.writes, stats.rollbacks
        rep.errors, rep.slow_sets = stats.errors, stats.slow_sets
        rep.max_gap_ms = stats.max_gap_s * 1000
        rep.stale = self.check()
        rep.stale_races = self.races(rep.stale)
        rep.stale_reads = self.observed.summary(self._fault_windows)
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
            for check in report.failed_rounds:
                say(check.line())
            for key in report.stale[:10]:
                for line in chaos.explain(key):
                    say(line)
    finally:
        with suppress(OSError):
            shutil.rmtree(workdir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description=__doc__,
        epilog="--staleness: quiet runs measuring the stale-set race instead, per listener"
        " setting and reader slowness (tests/support/staleness.py; --staleness --help).",
    )
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
    rounds = sum(len(r.failed_rounds) for r in reports)
    if stale or rounds:
        print(f"FAIL: {stale} stale keys at the end, {rounds} rounds with lost probes")
        return 1
    print("PASS: no stale keys, no lost probe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
