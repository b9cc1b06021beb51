"""psql as a DBA runs our SQL script."""

from __future__ import annotations

import subprocess

from tests.support.env import Env

# As a DBA pipes the script: stop at the first error, all of it or nothing.
PSQL = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"]


def psql(env: Env, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PSQL, "-d", env.dsn, "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
