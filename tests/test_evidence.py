"""The suite cannot pass for green having tested nothing: under CI, a test whose servers
do not start fails (tests/support/evidence.py), and the run's summary counts the
integration tests that really ran, which .ci/run requires to be more than none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.evidence import SUMMARY_ENV, unavailable
from tests.support.pgversion import version_of
from tests.support.servers import find_pg_bindir

ROOT = Path(__file__).resolve().parent.parent
# One test that needs the session's servers, and one that needs none.
SELECTED = [
    "tests/test_semantics.py::test_insert_deletes_the_new_rows_keys",
    "tests/test_units.py",
]


def test_unavailable_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        unavailable("no widget")
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match=r"no widget \(CI is set"):
            unavailable("no widget")


@pytest.fixture
def broken_bindir() -> Iterator[Path]:
    """PostgreSQL's programs, but an initdb that fails (as on a broken install). Outside
    pytest's 0700 tmp_path: the postgres user runs it."""
    bindir = Path(tempfile.mkdtemp(prefix="cdc-broken-pg-"))
    bindir.chmod(0o755)
    for program in find_pg_bindir().iterdir():
        (bindir / program.name).symlink_to(program)
    (bindir / "initdb").unlink()
    (bindir / "initdb").write_text("#!/bin/sh\necho 'initdb: broken on purpose' >&2\nexit 1\n")
    (bindir / "initdb").chmod(0o755)
    yield bindir
    shutil.rmtree(bindir)


def run_suite(
    bindir: Path, summary: Path, ci: str | None, workers: list[str]
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env |= {"CDC_INVALIDATOR_PG_BINDIR": str(bindir), SUMMARY_ENV: str(summary)}
    if ci is not None:
        env["CI"] = ci
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *SELECTED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    runs: list[dict[str, Any]] = json.loads(summary.read_text())
    assert len(runs) == 1, runs  # one entry per run, each naming its PostgreSQL
    assert runs[0]["pg"] == version_of(bindir), runs
    return result, runs[0]


# As `make test` runs it (two pytest-xdist workers: the controller, which writes the
# summary, collects nothing itself), and in one process.
@pytest.mark.parametrize(
    "workers", [["-n", "0"], ["-n", "2", "--dist", "loadfile"]], ids=["one-process", "xdist"]
)
@pytest.mark.parametrize("ci", [None, "true"], ids=["developer", "ci"])
def test_servers_that_cannot_start_fail_the_run_under_ci(
    broken_bindir: Path, tmp_path: Path, ci: str | None, workers: list[str]
) -> None:
    result, counts = run_suite(broken_bindir, tmp_path / "summary.json", ci, workers)
    output = result.stdout + result.stderr
    assert "initdb: broken on purpose" in output, output
    assert counts["unit"]["passed"] > 0, output
    assert counts["integration"]["passed"] == 0, output
    line = f"integration tests (real PostgreSQL {version_of(broken_bindir)} and Redis): 0 passed"
    assert line in result.stdout, output
    if ci is None:
        assert result.returncode == 0, output  # skipped, said so, and counted
        assert counts["integration"] == {"passed": 0, "failed": 0, "skipped": 2}, output
    else:
        assert result.returncode == 1, output
        assert counts["integration"] == {"passed": 0, "failed": 2, "skipped": 0}, output
        # Each failure names the PostgreSQL it ran on.
        assert output.count(f"ran on PostgreSQL {version_of(broken_bindir)} (") == 2, output
