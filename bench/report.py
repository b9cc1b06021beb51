"""The benchmark's report: its rows (metric | ours | floor | ratio | target | pass), the
machine, the settings and the other processes' CPU per phase, and the comparison with the
committed baseline (compare.py), rendered as markdown and written with the raw figures to
bench/results/latest.md and latest.json."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import psycopg

from cdc_invalidator.settings import Settings
from compare import baseline_section, trim
from harness import BENCH_DIR, Bench, Sizes

RESULTS_DIR = BENCH_DIR / "results"
NOISY_PCT = 10  # other processes' CPU (% of one core) above which a phase is marked noisy

PG_SETTINGS_SHOWN = [
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_wal_size",
]


@dataclass
class Row:
    """One line of the results table. passed None: reported, no target."""

    metric: str
    ours: str
    floor: str
    ratio: str
    target: str
    passed: bool | None


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    foreign_cpu_pct: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)  # markdown after the table (--peers)


def fmt_ms(value: float) -> str:
    return f"{value:.3f} ms"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def prefixed(mode: str, rows: list[Row]) -> list[Row]:
    return [
        Row(f"[{mode}] {row.metric}", row.ours, row.floor, row.ratio, row.target, row.passed)
        for row in rows
    ]


def describe_machine(bench: Bench) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    redis_info: dict[str, Any] = bench.redis.info("server")
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model.group(1).strip() if model else "unknown",
        "ram": f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB" if mem else "unknown",
        "kernel": platform.release(),
        "postgresql": f"{bench.execute('SHOW server_version')[0][0]} ({bench.pg_install.source})",
        "redis": str(redis_info.get("redis_version")),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "redis-py": dist_version("redis"),
        "hiredis": dist_version("hiredis"),
        "loadavg at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def code_checkout() -> tuple[Path, str | None, bool]:
    """Which cdc_invalidator runs: its directory, the git commit when it is a checkout (else
    None), and whether src/ or sql/ differ from that commit."""
    import cdc_invalidator

    where = Path(cdc_invalidator.__file__).resolve().parent
    git = ["git", "-C", str(where)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    )
    if head.returncode != 0:
        return where, None, False
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", ":/src", ":/sql"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return where, head.stdout.strip(), bool(dirty)


def describe_code() -> str:
    where, commit, dirty = code_checkout()
    if commit is None:
        return str(where)
    return f"{where} at {commit}{' with uncommitted changes' if dirty else ''}"


def describe_settings(bench: Bench, sizes: Sizes) -> dict[str, str]:
    out = {"code": describe_code()}
    out |= {f"pg {name}": str(bench.execute(f"SHOW {name}")[0][0]) for name in PG_SETTINGS_SHOWN}
    for name in ("save", "appendonly"):
        value = bench.redis.config_get(name).get(name)
        out[f"redis {name}"] = repr(value) if value == "" else str(value)
    out["listener"] = (
        "`cdc-invalidator run`, every setting at its default in every phase (replay_history "
        "too: history kept for replay), but database_url, redis_url and, in logical mode, "
        "slot_name (phase 6 also runs it with second_delete_ms = 0): "
        + ", ".join(
            f"{name}={f.get_default(call_default_factory=True)}"
            for name, f in Settings.model_fields.items()
            if name not in ("database_url", "redis_url", "tables") and not f.is_required()
        )
    )
    out["sizes"] = (
        f"latency {sizes.rate}/s, {round(sizes.rate * sizes.latency_s)} changes each for the "
        f"floor and ours in alternating {max(1, sizes.rate // 2)}-change blocks, after "
        f"{sizes.warmup} warm-up changes each; drain {sizes.drain_rows} rows, best of "
        f"{sizes.drain_repeats} against the best floor; "
        f"big drain {sizes.big_rows or 'skipped (--big)'}; writes: pgbench, 2 clients, "
        f"{sizes.write_s} s runs, {sizes.write_rounds} rounds of unwatched, watched + "
        "listener and watched without listener, each round in another order; the target "
        "ratio is of the medians; trigger mode repeats them with CPU-bound writers "
        "(pgbench's sessions with synchronous_commit off)"
    )
    return out


def verdict(passed: bool | None) -> str:
    if passed is None:
        return "info"
    return "PASS" if passed else "**FAIL**"


def render(report: Report) -> str:
    out = ["# cdc-invalidator benchmark", ""]
    out.append(
        f"Run {report.raw['started']}, {report.raw['elapsed_s']:.0f} s, `{report.raw['argv']}`."
    )
    out.append("")
    out.append("| metric | ours | floor | ratio | target | pass |")
    out.append("|---|---|---|---|---|---|")
    for row in report.rows:
        cells = [row.metric, row.ours, row.floor, row.ratio, row.target, verdict(row.passed)]
        out.append("| " + " | ".join(cells) + " |")
    failed = [row.metric for row in report.rows if row.passed is False]
    out.append("")
    if failed:
        out.append(f"**{len(failed)} target(s) missed:** {'; '.join(failed)}")
        out.append("")
    out += report.sections
    out += [
        "Floors, each of the same capture mode and packing UNLINKs as the listener does",
        "(500 keys per command in one hiredis pipeline; per hash slot on a cluster).",
        "Latency: trigger mode, a row trigger sends the row's keys in a pg_notify payload",
        "to a psycopg 3 `notifies()` loop that UNLINKs them (bench/floor_listener.py);",
        "logical mode, a minimal pgoutput consumer of a slot and publication of its own",
        "decodes the key columns, UNLINKs them and acknowledges (bench/floor_logical.py).",
        "It runs beside ours, each a separate process; the commits alternate between the",
        "floor's table and ours in half-second blocks, so both see the same machine.",
        "Deletion times come from Redis keyspace notifications timestamped by a third",
        "process (bench/keywatch.py). Drain: trigger mode, one Python process SELECTs the",
        "changed rows' key columns and UNLINKs their keys; logical mode, floor_logical.py",
        "streams a slot of its own on the listener's publication, created before the",
        "changes, deleting and acknowledging every 10,000 keys. Cluster drain: the same",
        "reads, then one UNLINK per hash slot over the whole backlog, one pipeline per",
        "node. Ours is timed from its `listener_started` log line until every key is gone.",
        "Replay: the same history rows read back (the queue's key columns taken out of",
        "the JSON by the server; history_v1's batches parsed in Python), the distinct keys",
        "UNLINKed. Writes: the same pgbench UPDATE on an unwatched table, interleaved;",
        "CPU-bound writers: the same with synchronous_commit off in pgbench's sessions.",
        "",
        "## Machine",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in report.machine.items()]
    out += ["", "## Noise: CPU used by other processes during each phase", ""]
    noisy = [k for k, v in report.foreign_cpu_pct.items() if v > NOISY_PCT]
    out += [f"- {k}: {v:.0f} % of a core" for k, v in report.foreign_cpu_pct.items()]
    if noisy:
        out.append(f"- **noisy** (over {NOISY_PCT} % of a core): {', '.join(noisy)}")
    out += ["", "## Settings", ""]
    out += [f"- {k}: {v}" for k, v in report.settings.items()]
    return "\n".join(out) + "\n"


def write_results(report: Report) -> None:
    """latest.md (the rendered report, with the comparison against bench/baseline.json)
    and latest.json (the rows and the raw figures); the comparison's summary last."""
    _, commit, dirty = code_checkout()
    payload = {
        "machine": report.machine,
        "settings": report.settings,
        "code": {"commit": commit, "dirty": dirty},
        "foreign_cpu_pct": report.foreign_cpu_pct,
        "rows": [asdict(row) | {"verdict": verdict(row.passed)} for row in report.rows],
        "raw": report.raw,
    }
    section, summary = baseline_section(trim(payload))
    report.sections += section
    text = render(report)
    print()
    print(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text(text)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {RESULTS_DIR / 'latest.md'}, {RESULTS_DIR / 'latest.json'}")
    print("\n".join(summary))
