"""Phase 8, bulk changes: what one statement over many rows costs its writer, and how
long its keys stay cached after its COMMIT, in each capture mode.

- one statement over every row (1M; --quick 100k) of each kind, against the same
  statement on its unwatched twin (bulk_plain), in interleaved rounds: `UPDATE ... SET
  n = n + 1`, `DELETE`, and the `INSERT ... SELECT` that puts the rows back;
- a backfill: every row UPDATEd by statements of BACKFILL_STEP rows, each its own
  transaction, one after the other.

In trigger mode the one statements and the backfill are measured again with
`bulk_sweep_rows` installed (BULK_SWEEP_ROWS: a statement of that many rows or more
queues one sweep of the table's templates instead of its rows; the backfill's smaller
statements are packed as before; rows named "... with bulk_sweep_rows"), one round of
each; the defaults are installed again after it. Its keys are all the table's: Redis holds
nothing else, so its sweep finds exactly the keys the statement's rows had.

The listener runs throughout, with default settings (so the unwatched statement pays for
whatever a running listener costs the server). Before each watched run every row's two
keys are cached and Redis holds nothing else. Reported per kind: the writer's time
(statements and COMMITs) watched and unwatched, and their ratio; from the (last) COMMIT
until the last key is gone, and the CPU that Redis, the listener and PostgreSQL (every
process of the cluster: the WAL sender, autovacuum) used meanwhile in that run, which
tells a wait on Redis's own work from one on two shared cores; the WAL each run wrote
(the table's own and, in trigger mode, the queue's; logical mode's decoding writes
none); the listener's peak RSS. Each timed run starts after VACUUM and CHECKPOINT,
outside its timing, so that both pay the same full-page writes.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

from psycopg import sql

from harness import BULK_PLAIN, BULK_WATCHED, Bench, Listener, Target
from procs import tree_cpu_s, wait_for, wait_idle
from report import Row

BACKFILL_STEP = 10_000
ROUNDS = 2  # of the one statements, each in both orders
# Each kind's statement over the ids [lo, hi]: a round runs them in this order, so the
# INSERT puts back what the DELETE took (the rows as the table was loaded).
STATEMENTS = {
    "UPDATE": "UPDATE {} SET n = n + 1 WHERE id BETWEEN %(lo)s AND %(hi)s",
    "DELETE": "DELETE FROM {} WHERE id BETWEEN %(lo)s AND %(hi)s",
    "INSERT ... SELECT": "INSERT INTO {} (id, email) SELECT g, 'u' || g || '@example.com' "
    "FROM generate_series(%(lo)s::int, %(hi)s::int) g",
}
# Targets (issue 17): a bulk statement costs its writer at most 1.3x unwatched in trigger
# mode; in both modes every key is gone within 5 s of COMMIT, memory bounded.
# Trigger mode's second measure: statements of this many rows or more are swept.
BULK_SWEEP_ROWS = 100_000
WRITER_TARGET = 1.3
KEYS_GONE_TARGET_S = 5.0
RSS_TARGET_MB = 100.0


@dataclass
class Run:
    writer_s: float  # the statements and their COMMITs
    wal_bytes: int
    keys_gone_s: float | None  # from the last COMMIT; None: unwatched
    # CPU seconds in that time: Redis, the listener, PostgreSQL (None: unwatched)
    cpu_s: tuple[float, float, float] | None = None


@dataclass
class Bulk:
    kind: str  # the statement, and whether one or a backfill
    rows: int
    statements: int
    plain: list[Run]
    watched: list[Run]

    @property
    def plain_s(self) -> float:
        return statistics.median(r.writer_s for r in self.plain)

    @property
    def watched_s(self) -> float:
        return statistics.median(r.writer_s for r in self.watched)

    @property
    def keys_gone_s(self) -> float:
        return max(r.keys_gone_s or 0.0 for r in self.watched)


@dataclass
class BulkPhase:
    statements: list[Bulk]  # one statement of each kind, then the backfill
    peak_rss_mb: float


def wal_position(target: Target) -> int:
    row = target.admin.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
    ).fetchone()
    assert row is not None
    return int(row[0])


def write(target: Target, kind: str, table: str, rows: int, step: int) -> tuple[float, int, float]:
    """Every row of `table` written by `kind`'s statements of `step` rows (autocommit:
    each its own transaction): the writer's seconds, the WAL written, and when the last
    COMMIT returned (time.monotonic())."""
    query = sql.SQL(STATEMENTS[kind]).format(sql.Identifier(table))
    wal = wal_position(target)
    started = time.monotonic()
    for lo in range(1, rows + 1, step):
        target.admin.execute(query, {"lo": lo, "hi": min(rows, lo + step - 1)})
    committed = time.monotonic()
    return committed - started, wal_position(target) - wal, committed


@dataclass
class Rig:
    """The phase's listener and its target: one timed run after another."""

    bench: Bench
    listener: Listener
    target: Target

    def run(self, kind: str, *, watched: bool, rows: int, step: int) -> Run:
        bench, target = self.bench, self.target
        table = BULK_WATCHED if watched else BULK_PLAIN
        bench.quiesce(target, table)
        wait_idle(self.listener.pid)  # the previous run's deletes (and second deletes) done
        if watched:
            bench.redis.flushall()
            bench.set_keys(range(1, rows + 1))
        writer_s, wal, committed = write(target, kind, table, rows, step)
        print(
            f"  [{target.mode}] {kind} of {rows:,} rows in {-(-rows // step)} statement(s), "
            f"{'watched' if watched else 'unwatched'}: {writer_s:.2f} s",
            flush=True,
        )
        if not watched:
            return Run(writer_s, wal, None)
        redis0, listener0, pg0 = self.cpu_s()

        def gone() -> bool:
            self.listener.check()
            return bench.dbsize() == 0

        keys_gone = wait_for(gone, max(300.0, rows / 2000), "the bulk statement's keys", 0.005)
        redis1, listener1, pg1 = self.cpu_s()
        cpu = (redis1 - redis0, listener1 - listener0, pg1 - pg0)
        return Run(writer_s, wal, keys_gone - committed, cpu)

    def cpu_s(self) -> tuple[float, float, float]:
        """CPU seconds so far of Redis, the listener and the PostgreSQL cluster."""
        redis_pid = int(self.bench.redis.info("server")["process_id"])
        return (
            tree_cpu_s(redis_pid),
            tree_cpu_s(self.listener.pid),
            tree_cpu_s(self.bench.pg.pid or 0),
        )


def measure_bulk(
    bench: Bench, rows: int, target: Target, *, rounds: int = ROUNDS, backfill: bool = True
) -> BulkPhase:
    listener = Listener(bench, f"{target.config.stem}-bulk", target)
    try:
        listener.wait_started()
        rig = Rig(bench, listener, target)
        runs: dict[tuple[str, bool], list[Run]] = {}
        for round_no in range(rounds):
            order = (False, True) if round_no % 2 == 0 else (True, False)
            for watched in order:  # each kind after the one before, on the same table
                for kind in STATEMENTS:
                    run = rig.run(kind, watched=watched, rows=rows, step=rows)
                    runs.setdefault((kind, watched), []).append(run)
        statements = [
            Bulk(f"{kind}, one statement", rows, 1, runs[kind, False], runs[kind, True])
            for kind in STATEMENTS
        ]
        steps = -(-rows // BACKFILL_STEP)
        if backfill:
            statements.append(
                Bulk(
                    f"UPDATE, backfill of {steps} statements of {BACKFILL_STEP:,}",
                    rows,
                    steps,
                    [rig.run("UPDATE", watched=False, rows=rows, step=BACKFILL_STEP)],
                    [rig.run("UPDATE", watched=True, rows=rows, step=BACKFILL_STEP)],
                )
            )
        rss = listener.peak_rss_mb()
    finally:
        listener.stop()
        bench.redis.flushall()
    return BulkPhase(statements, rss)


def measure_bulk_swept(bench: Bench, rows: int, target: Target) -> BulkPhase:
    """Trigger mode: the one statements with `bulk_sweep_rows = BULK_SWEEP_ROWS`
    installed, one round, and the backfill (its statements smaller: packed, each counted
    up to BULK_SWEEP_ROWS rows first); the target's own config is installed again
    afterwards."""
    config = target.config.with_name(f"{target.mode}-bulk-sweep.toml")
    config.write_text(f"bulk_sweep_rows = {BULK_SWEEP_ROWS}\n" + target.config.read_text())
    swept = dataclasses.replace(target, config=config)
    bench.cli(swept, "install")
    try:
        return measure_bulk(bench, rows, swept, rounds=1)
    finally:
        bench.cli(target, "install")


def bulk_rows(mode: str, phase: BulkPhase, variant: str = "") -> list[Row]:
    """The phase's rows (without the mode prefix); `variant` (" with bulk_sweep_rows")
    is appended to each statement's name."""
    rows: list[Row] = []
    for bulk in phase.statements:
        name = f"bulk {bulk.kind}, {bulk.rows:,} rows{variant}"
        ratio = bulk.watched_s / bulk.plain_s
        writer_target = WRITER_TARGET if mode == "trigger" else None
        wal_watched = statistics.median(r.wal_bytes for r in bulk.watched)
        wal_plain = statistics.median(r.wal_bytes for r in bulk.plain)
        # (of the run whose keys went last: the one the row after COMMIT reports)
        slowest = max(bulk.watched, key=lambda r: r.keys_gone_s or 0.0)
        rows += [
            Row(
                f"{name}: writer's time, watched + listener vs unwatched"
                + (f" (medians of {len(bulk.plain)})" if len(bulk.plain) > 1 else ""),
                f"{bulk.watched_s:.2f} s",
                f"{bulk.plain_s:.2f} s",
                f"{ratio:.2f}x",
                f"≤ {writer_target:.2f}x" if writer_target else "",
                ratio <= writer_target if writer_target else None,
            ),
            Row(
                f"{name}: last COMMIT → last key deleted",
                f"{bulk.keys_gone_s:.2f} s",
                "",
                "",
                f"≤ {KEYS_GONE_TARGET_S:.0f} s",
                bulk.keys_gone_s <= KEYS_GONE_TARGET_S,
            ),
            Row(
                f"{name}: CPU from the last COMMIT to the last key, Redis / listener / PostgreSQL",
                " / ".join(f"{s:.2f}" for s in slowest.cpu_s or ()) + " s",
                "",
                "",
                "",
                None,
            ),
            Row(
                f"{name}: WAL written, watched vs unwatched",
                f"{wal_watched / 2**20:,.0f} MiB",
                f"{wal_plain / 2**20:,.0f} MiB",
                f"{wal_watched / wal_plain:.2f}x",
                "",
                None,
            ),
        ]
    rows.append(
        Row(
            f"bulk statements{variant}: listener peak RSS",
            f"{phase.peak_rss_mb:.0f} MB",
            "",
            "",
            f"≤ {RSS_TARGET_MB:.0f} MB",
            phase.peak_rss_mb <= RSS_TARGET_MB,
        )
    )
    return rows
