"""A run against the committed baseline (bench/baseline.json): each metric row present in
both runs under the same name, its figure then and now, the change in percent, and the
regressions (a figure more than WORSE_PCT worse, or a target passed then and missed now).

Pure: no servers, no bench imports. report.py calls baseline_section() after every run;
baseline.py writes the baseline with trim().
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).resolve().parent / "baseline.json"
WORSE_PCT = 10.0  # a figure this much worse than the baseline's is a regression
FORMAT = 1

# Which way is better, by the unit of the row's own figure ("ours"); a ratio to the floor
# goes the way its figure goes (ours/floor of a time: lower; of a throughput: higher).
LOWER_IS_BETTER = {"ms", "s", "µs", "MB"}
HIGHER_IS_BETTER = {"tps", "changes/s", "%"}
# The floors' units that measure the machine's speed: how long the same minimal work took,
# or how much of it went through in a second.
FLOOR_TIMES = {"ms", "s", "µs"}
FLOOR_RATES = {"tps", "changes/s"}
FLOOR_ROWS_MIN = 3  # floors in both runs needed before their drift is told

_NUMBER = re.compile(r"\s*(-?\d[\d,]*(?:\.\d+)?)\s*(%|[A-Za-zµ]+(?:/s)?)?")
_FRACTION = re.compile(r"\s*(\d+)/(\d+)\s*$")  # "900/900": changes whose keys went


class BaselineError(Exception):
    """bench/baseline.json is there but not a baseline: the message says why."""


def trim(latest: dict[str, Any]) -> dict[str, Any]:
    """What a comparison needs of a run, from latest.json's payload: the rows, the
    arguments and sizes, the code's commit, the machine (with the PostgreSQL and Redis
    versions), the settings and the other processes' CPU; not the raw figures."""
    raw = latest.get("raw", {})
    settings = {k: v for k, v in latest.get("settings", {}).items() if k != "code"}
    return {
        "format": FORMAT,
        "started": raw.get("started"),
        "elapsed_s": raw.get("elapsed_s"),
        "argv": raw.get("argv"),
        "args": raw.get("args"),
        # As JSON has them: a run's own sizes hold a tuple (sweep_keys) where the
        # baseline read back holds a list, and the two compared unequal, every full run
        # noting "the sizes differ" against a baseline of the same sizes.
        "sizes": json.loads(json.dumps(raw.get("sizes"))),
        "code": latest.get("code"),
        "machine": latest.get("machine", {}),
        "settings": settings,
        "foreign_cpu_pct": latest.get("foreign_cpu_pct", {}),
        "rows": [
            {k: row.get(k) for k in ("metric", "ours", "floor", "ratio", "target", "verdict")}
            for row in latest.get("rows", [])
        ],
    }


def partial_reasons(run: dict[str, Any]) -> list[str]:
    """Why a (trimmed) run is not a full one, a baseline's kind: empty when it is."""
    args = run.get("args")
    if not isinstance(args, dict):
        return ["its arguments are not recorded (a run of an older bench/run.py)"]
    reasons = [f"--{name.replace('_', '-')}" for name in ("quick", "drain_only") if args.get(name)]
    capture = args.get("capture")
    if not isinstance(capture, list) or sorted(capture) != ["logical", "trigger"]:
        reasons.append(f"--capture {' '.join(map(str, capture or []))} (not both modes)")
    if not run.get("rows"):
        reasons.append("no rows")
    return reasons


def load_baseline(path: Path) -> dict[str, Any] | None:
    """The baseline at path; None when there is no such file."""
    try:
        data: object = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise BaselineError(f"{path} is not a baseline: not a JSON object")
    rows = data.get("rows")
    if not isinstance(rows, list) or not all(
        isinstance(row, dict) and isinstance(row.get("metric"), str) for row in rows
    ):
        raise BaselineError(f"{path} is not a baseline: no list of rows with a metric each")
    return data


def figure(text: str) -> tuple[float, str | None] | None:
    """A cell's leading number and its unit ("3,258 tps" -> 3258.0, "tps"); "65 µs + 20 µs"
    is summed; "900/900" is a share (100.0, "%"). None when the cell has no number."""
    if fraction := _FRACTION.match(text):
        done, of = int(fraction.group(1)), int(fraction.group(2))
        return (100.0 * done / of if of else 0.0), "%"
    if " + " in text and (summed := _sum(text.split(" + "))) is not None:
        return summed
    match = _NUMBER.match(text)
    if match is None:
        return None
    return float(match.group(1).replace(",", "")), match.group(2)


def _sum(parts: list[str]) -> tuple[float, str | None] | None:
    """Parts of one unit, each a number alone, summed; None when they are not."""
    total, units = 0.0, set()
    for part in parts:
        match = _NUMBER.fullmatch(part)
        if match is None:
            return None
        total += float(match.group(1).replace(",", ""))
        units.add(match.group(2))
    return (total, units.pop()) if len(units) == 1 else None


def sense(row: dict[str, Any]) -> int | None:
    """+1 when a larger figure is better, -1 when smaller is, None when the row does not say."""
    ours = figure(str(row.get("ours") or ""))
    unit = ours[1] if ours else None
    if unit in HIGHER_IS_BETTER:
        return 1
    if unit in LOWER_IS_BETTER:
        return -1
    return None


@dataclass(frozen=True)
class Change:
    """One metric row in both runs."""

    metric: str
    basis: str  # "ratio" (to the floor) when both runs' rows have one, else "ours"
    before: str
    after: str
    pct: float | None  # the basis figure's change, None when it has no number
    regressions: tuple[str, ...]  # why this row is a regression; empty when it is not


@dataclass(frozen=True)
class Comparison:
    changes: list[Change]
    new: list[str]  # metrics of this run only
    gone: list[str]  # metrics of the baseline only
    notes: list[str]

    @property
    def regressions(self) -> list[Change]:
        return [change for change in self.changes if change.regressions]


def cell(row: dict[str, Any]) -> str:
    ours, ratio = str(row.get("ours") or ""), str(row.get("ratio") or "")
    return ", ".join(part for part in (ours, ratio) if part) or "-"


def compare_row(old: dict[str, Any], new: dict[str, Any]) -> Change:
    basis, pct = "ours", None
    for name in ("ratio", "ours"):
        a, b = figure(str(old.get(name) or "")), figure(str(new.get(name) or ""))
        if a is not None and b is not None:
            basis = name
            pct = (b[0] - a[0]) / abs(a[0]) * 100 if a[0] else None
            break
    why = []
    direction = sense(new) or sense(old)
    if pct is not None and direction is not None and -direction * pct > WORSE_PCT:
        why.append(f"{basis} {-direction * pct:.0f} % worse")
    if old.get("verdict") == "PASS" and new.get("verdict") not in ("PASS", "info"):
        why.append("PASS became FAIL")
    return Change(str(new["metric"]), basis, cell(old), cell(new), pct, tuple(why))


def _sizes_note(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    notes = []
    if baseline.get("sizes") != current.get("sizes") or baseline.get("args", {}).get(
        "quick"
    ) != current.get("args", {}).get("quick"):
        notes.append(
            "The sizes differ (baseline "
            f"`{baseline.get('argv')}`, this run `{current.get('argv')}`): rows are compared "
            "only where the metric names match, and a figure of other sizes moves for that "
            "reason too."
        )
    elif baseline.get("argv") != current.get("argv"):
        notes.append(
            f"The options differ (baseline `{baseline.get('argv')}`, this run "
            f"`{current.get('argv')}`): rows of one run only are listed as new or gone."
        )
    old_pg = baseline.get("machine", {}).get("postgresql")
    new_pg = current.get("machine", {}).get("postgresql")
    if old_pg and new_pg and str(old_pg).split(".")[0] != str(new_pg).split(".")[0]:
        notes.append(
            f"PostgreSQL differs (baseline {old_pg}, this run {new_pg}): a figure moves for "
            "that reason too."
        )
    return notes


def _machine_note(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Another CPU model or count than the baseline's: said, as another PostgreSQL is."""
    old, new = baseline.get("machine", {}), current.get("machine", {})

    def cpus(machine: dict[str, Any]) -> str:
        return f"{machine.get('nproc', '?')} x {machine.get('cpu', '?')}"

    if not all(m.get("cpu") for m in (old, new)) or cpus(old) == cpus(new):
        return []
    return [
        f"The machine differs (baseline {cpus(old)}, this run {cpus(new)}): a figure moves "
        "for that reason too."
    ]


def floor_drift(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> tuple[float, float, float, int] | None:
    """How long the floors' work took in this run against the baseline, over the rows
    whose floor both runs measured in one unit of time or rate: (median, lowest, highest
    factor, rows), a factor above 1 meaning slower; None with fewer than FLOOR_ROWS_MIN.
    A floor is the same minimal work in both runs, so its drift is the machine's."""
    factors = []
    for name, new in after.items():
        old = before.get(name)
        if old is None:
            continue
        a, b = figure(str(old.get("floor") or "")), figure(str(new.get("floor") or ""))
        if a is None or b is None or a[1] != b[1] or a[0] <= 0 or b[0] <= 0:
            continue
        if a[1] in FLOOR_TIMES:
            factors.append(b[0] / a[0])
        elif a[1] in FLOOR_RATES:
            factors.append(a[0] / b[0])
    if len(factors) < FLOOR_ROWS_MIN:
        return None
    return statistics.median(factors), min(factors), max(factors), len(factors)


def _drift_note(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    drift = floor_drift(before, after)
    if drift is None or abs(drift[0] - 1) * 100 <= WORSE_PCT:
        return []
    median, low, high, rows = drift
    return [
        f"The floors took {median:.2f}x the baseline's time in this run (the median of the "
        f"{rows} rows whose floor both runs measured; {low:.2f}x to {high:.2f}x): this "
        f"machine was {'slower' if median > 1 else 'faster'}. A figure judged on ours alone "
        "(no floor) moves with the machine; a ratio to its floor much less."
    ]


def compare(baseline: dict[str, Any], current: dict[str, Any]) -> Comparison:
    """Both trimmed runs (trim()), row by row under the same metric name."""
    before = {str(row["metric"]): row for row in baseline.get("rows", [])}
    after = {str(row["metric"]): row for row in current.get("rows", [])}
    return Comparison(
        changes=[compare_row(before[name], row) for name, row in after.items() if name in before],
        new=[name for name in after if name not in before],
        gone=[name for name in before if name not in after],
        notes=[
            *_sizes_note(baseline, current),
            *_machine_note(baseline, current),
            *_drift_note(before, after),
        ],
    )


def describe(baseline: dict[str, Any]) -> str:
    """'commit abc1234, 2026-12-01T20:42:00+00:00' of a baseline."""
    code = baseline.get("code") or {}
    commit = code.get("commit") or "unknown"
    if code.get("dirty"):
        commit += " with uncommitted changes"
    return f"commit {commit}, {baseline.get('started') or 'date unknown'}"


def _pct(change: Change) -> str:
    if change.pct is None:
        return ""
    return f"{change.basis} {change.pct:+.1f} %"


def render(baseline: dict[str, Any], comparison: Comparison) -> list[str]:
    """The markdown section of latest.md."""
    out = [f"## Against the committed baseline ({describe(baseline)})", ""]
    out.append(
        "Each row present in both runs under the same name: the figure then and now, and "
        "the change of its ratio to the floor where both have one, else of ours. A "
        f"regression is a figure more than {WORSE_PCT:.0f} % worse (the way better goes "
        "is read from the row's unit: times and memory down, throughput and hit rates up; "
        "rows without a unit are not judged) or a target passed then and missed now."
    )
    out.append("")
    out += [*comparison.notes, *([""] if comparison.notes else [])]
    out.append("| metric | baseline | this run | change | regression |")
    out.append("|---|---|---|---|---|")
    for change in comparison.changes:
        flag = f"**{'; '.join(change.regressions)}**" if change.regressions else ""
        cells = [change.metric, change.before, change.after, _pct(change), flag]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if comparison.new:
        out += [f"New in this run: {'; '.join(comparison.new)}", ""]
    if comparison.gone:
        out += [f"Gone (in the baseline only): {'; '.join(comparison.gone)}", ""]
    regressions = comparison.regressions
    if regressions:
        names = "; ".join(change.metric for change in regressions)
        out += [f"**{len(regressions)} regression(s) against the baseline:** {names}", ""]
    else:
        out += ["No regression against the baseline.", ""]
    return out


def summary(baseline: dict[str, Any], comparison: Comparison, path: Path) -> list[str]:
    """The lines printed at the end of a run."""
    counts = (
        f"{len(comparison.changes)} row(s) compared, {len(comparison.new)} new, "
        f"{len(comparison.gone)} gone"
    )
    regressions = comparison.regressions
    head = f"against {path.name} ({describe(baseline)}): {counts}, "
    notes = [f"  note: {note}" for note in comparison.notes]
    if not regressions:
        return [head + "no regression", *notes]
    lines = [head + f"{len(regressions)} REGRESSION(S):"]
    lines += [
        f"  {c.metric}: {c.before} -> {c.after} ({'; '.join(c.regressions)})" for c in regressions
    ]
    return [*lines, *notes]


def baseline_section(current: dict[str, Any], path: Path = BASELINE) -> tuple[list[str], list[str]]:
    """The markdown lines for latest.md and the lines for stdout of a run (trimmed) against
    the baseline at path: one line each when there is none or it is unreadable."""
    try:
        baseline = load_baseline(path)
    except BaselineError as exc:
        line = f"No comparison: {exc}"
        return [line, ""], [line]
    if baseline is None:
        line = f"No comparison: no {path.name} (`make bench-baseline` writes it from a full run)."
        return [line, ""], [line]
    comparison = compare(baseline, current)
    return render(baseline, comparison), summary(baseline, comparison, path)
