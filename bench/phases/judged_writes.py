"""Phase 3b, trigger mode: what a column filter costs the writers. Single-row UPDATE
throughput with pgbench (2 clients, 2 threads) on a table watched with
`ignore_columns = ["n"]` against the same statement on a table watched without a filter
(W_WATCHED), in interleaved rounds, with no listener running: the writers' cost alone
(the queue is emptied after). Two UPDATEs on the filtered table: one that bumps only the
ignored column n (judged unchanged: nothing queued) and one that bumps the counted
column m (judged changed: queued, as without a filter). The capture function then pairs
old and new rows by primary key and compares the counted columns' text, where the
unfiltered one pairs by position and compares nothing.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

import psycopg
from psycopg import sql

from harness import TEMPLATES, W_WATCHED, WRITE_ROWS, Bench, Sizes, Target
from phases.writes import pgbench
from report import Row

W_JUDGED = "w_judged"


@dataclass
class JudgedWrites:
    unfiltered_tps: float  # W_WATCHED, n = n + 1, every UPDATE queued
    ignored_tps: float  # W_JUDGED, n = n + 1: judged unchanged, nothing queued
    counted_tps: float  # W_JUDGED, m = m + 1: judged changed, queued
    unfiltered_runs: list[float]
    ignored_runs: list[float]
    counted_runs: list[float]


def prepare_judged(bench: Bench, target: Target) -> None:
    """The filtered table (users-like, plus a counted column m), in the target's config
    with ignore_columns = ["n"], installed."""
    bench.create_table(W_JUDGED, range(1, WRITE_ROWS + 1), target.admin)
    target.admin.execute(
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS m int NOT NULL DEFAULT 0").format(
            sql.Identifier(W_JUDGED)
        )
    )
    with target.config.open("a") as f:
        f.write(
            f'[tables."public.{W_JUDGED}"]\nkeys = {json.dumps(TEMPLATES)}\n'
            'ignore_columns = ["n"]\n'
        )
    bench.cli(target, "install")


def measure_judged_writes(bench: Bench, sizes: Sizes, target: Target) -> JudgedWrites:
    dbname = str(psycopg.conninfo.conninfo_to_dict(target.dsn)["dbname"])
    # (table, the column bumped)
    variants = {
        "unfiltered": (W_WATCHED, "n"),
        "ignored": (W_JUDGED, "n"),
        "counted": (W_JUDGED, "m"),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(sizes.write_rounds):
        for name, (table, column) in variants.items():
            runs[name].append(pgbench(bench, table, sizes.write_s, dbname, column)[0])
        print(
            "  [trigger] UPDATE tps: no filter {:.0f}, ignored column {:.0f}, "
            "counted column {:.0f}".format(*(runs[n][-1] for n in variants)),
            flush=True,
        )
    queued = target.admin.execute(
        "SELECT coalesce(sum(coalesce(rows, 1)), 0) FROM cdc_invalidator.queue_v1 "
        "WHERE table_name = %s",
        [W_JUDGED],
    ).fetchone()
    print(f"  [trigger] filtered table: {queued[0] if queued else '?'} changes queued", flush=True)
    bench.admin.execute("TRUNCATE cdc_invalidator.queue_v1")
    return JudgedWrites(
        unfiltered_tps=statistics.median(runs["unfiltered"]),
        ignored_tps=statistics.median(runs["ignored"]),
        counted_tps=statistics.median(runs["counted"]),
        unfiltered_runs=runs["unfiltered"],
        ignored_runs=runs["ignored"],
        counted_runs=runs["counted"],
    )


def judged_rows(writes: JudgedWrites) -> list[Row]:
    """The column filter's write cost (without the mode prefix)."""
    base = f"{writes.unfiltered_tps:,.0f} tps"
    return [
        Row(
            "UPDATE tps, ignore_columns: ignored column only (nothing queued) vs no filter",
            f"{writes.ignored_tps:,.0f} tps",
            base,
            f"{writes.ignored_tps / writes.unfiltered_tps:.2f}",
            "",
            None,
        ),
        Row(
            "UPDATE tps, ignore_columns: counted column (queued) vs no filter",
            f"{writes.counted_tps:,.0f} tps",
            base,
            f"{writes.counted_tps / writes.unfiltered_tps:.2f}",
            "",
            None,
        ),
    ]
