"""What a test run proved, so that a suite that tested nothing cannot pass for green.

- `unavailable()`: a test that cannot get what it needs from the machine (a server that
  does not start, a missing program, no IPv6 loopback) skips on a developer's machine
  and *fails* under CI (the `CI` environment variable set), where a skip would hide it.
- The plugin (registered by tests/conftest.py) marks every test that runs on real
  servers as `servers` (it uses one of SERVER_FIXTURES, or says so with the marker),
  counts those integration tests apart in the summary line, and writes the
  counts as JSON to the file named by `CDC_TEST_SUMMARY`: .ci/run reads it and fails
  a run in which no integration test passed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import NoReturn

import pytest

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
    """Counts each test's outcome once (a failed setup or teardown makes it failed)."""

    def __init__(self) -> None:
        self.integration: set[str] = set()
        self.outcome: dict[str, str] = {}

    @pytest.hookimpl
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if is_integration(item):
                self.integration.add(item.nodeid)
                if item.get_closest_marker("servers") is None:
                    item.add_marker(pytest.mark.servers)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
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

        terminalreporter.write_line(
            f"integration tests (real PostgreSQL and Redis): {said('integration')}; "
            f"other tests: {said('unit')}"
        )

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        if path := os.environ.get(SUMMARY_ENV):
            Path(path).write_text(json.dumps(self.counts()))
