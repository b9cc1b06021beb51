"""What a test run proved, so that a suite that tested nothing cannot pass for green.

- `unavailable()`: a test that cannot get what it needs from the machine (a server that
  does not start, a missing program, no IPv6 loopback) skips on a developer's machine
  and *fails* under CI (the `CI` environment variable set), where a skip would hide it.
- The plugin (registered by tests/conftest.py) marks every test that runs on real
  servers as `servers` (it uses one of SERVER_FIXTURES, or says so with the marker),
  counts those integration tests apart in the summary line, and writes the
  counts as JSON to the file named by `CDC_TEST_SUMMARY`: .ci/run reads it and fails
  a run in which no integration test passed.
- Each run names its PostgreSQL (`--pg`, tests/support/pgversion.py): in the header, in
  the summary line, in each failed integration test's report, and in its entry of the
  summary file, which holds one entry per run (`make test` runs the suite on two
  versions, each a pytest run of its own).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.support.pgversion import PgInstall

# The fixtures that start real servers (a test using one, directly or through another
# fixture such as `env`, is an integration test). A test that starts its own inline says
# so with @pytest.mark.servers.
SERVER_FIXTURES = frozenset(
    {
        "servers",  # tests/conftest.py: the session's PostgreSQL and Redis
        "own_servers",
        "cluster",  # tests/test_cluster.py: a Redis Cluster
        "own_cluster",
        "tls_redis",  # tests/test_redis_tls.py
        "mtls_redis",
        "locked",  # tests/test_secrets.py: password-protected servers
        "sentinel_setup",  # tests/test_sentinel.py
        "vanishing_host",  # tests/test_standby.py: a network namespace
    }
)
SUMMARY_ENV = "CDC_TEST_SUMMARY"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(what: str) -> NoReturn:
    """This test cannot run here because of `what`: skip, or fail under CI."""
    if under_ci():
        pytest.fail(
            f"{what} (CI is set: a test that cannot run fails, it does not skip)", pytrace=False
        )
    pytest.skip(what)


def is_integration(item: pytest.Item) -> bool:
    fixtures = set(getattr(item, "fixturenames", ()))
    return bool(fixtures & SERVER_FIXTURES) or item.get_closest_marker("servers") is not None


class Evidence:
    """Counts each test's outcome once (a failed setup or teardown makes it failed).
    `pg`: the PostgreSQL the servers run (None: none was found, the servers' fixtures
    say so)."""

    def __init__(self, pg: PgInstall | None = None) -> None:
        self.pg = pg
        self.integration: set[str] = set()
        self.outcome: dict[str, str] = {}

    @pytest.hookimpl
    def pytest_report_header(self) -> str:
        return f"postgresql: {self.pg.describe() if self.pg else 'none found'}"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Iterator[None]:
        outcome: Any = yield
        report: pytest.TestReport = outcome.get_result()
        if report.failed and self.pg and item.nodeid in self.integration:
            report.sections.append(("server", f"ran on {self.pg.describe()}"))

    @pytest.hookimpl
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if is_integration(item):
                self.integration.add(item.nodeid)
                if item.get_closest_marker("servers") is None:
                    item.add_marker(pytest.mark.servers)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Under pytest-xdist the controller collects nothing: the marker set at collection
        # reaches it in the report's keywords, from the worker that ran the test.
        if "servers" in report.keywords:
            self.integration.add(report.nodeid)
        if report.failed:
            self.outcome[report.nodeid] = "failed"
        elif report.skipped and self.outcome.get(report.nodeid) != "failed":
            self.outcome[report.nodeid] = "skipped"
        elif report.when == "call" and report.passed:
            self.outcome.setdefault(report.nodeid, "passed")

    def counts(self) -> dict[str, dict[str, int]]:
        tallies = {"integration": Counter[str](), "unit": Counter[str]()}
        for nodeid, outcome in self.outcome.items():
            tallies["integration" if nodeid in self.integration else "unit"][outcome] += 1
        return {
            kind: {k: tally[k] for k in ("passed", "failed", "skipped")}
            for kind, tally in tallies.items()
        }

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        counts = self.counts()

        def said(kind: str) -> str:
            return ", ".join(f"{n} {outcome}" for outcome, n in counts[kind].items())

        version = f" {self.pg.version}" if self.pg else ""
        terminalreporter.write_line(
            f"integration tests (real PostgreSQL{version} and Redis): {said('integration')}; "
            f"other tests: {said('unit')}"
        )

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Append this run's counts to the summary file (a JSON list, one entry a run):
        the controller's, which saw every worker's reports, not each worker's part."""
        if hasattr(session.config, "workerinput"):
            return
        if path := os.environ.get(SUMMARY_ENV):
            summary = Path(path)
            text = summary.read_text() if summary.exists() else ""
            runs: list[dict[str, Any]] = json.loads(text) if text.strip() else []
            runs.append({"pg": self.pg.version if self.pg else None, **self.counts()})
            summary.write_text(json.dumps(runs))
