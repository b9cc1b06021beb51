"""Numeric settings past what their use can take are configuration errors (exit 2, the
setting named), not a traceback at the first wait, nor sweeps that fail for good.

Found by hand against a real PostgreSQL 15 and Redis 7.0: `connect_timeout_s = inf`
ended every command that connects with a traceback (OverflowError); `redis_timeout_s =
1e300` ended `check` and `run` so; `poll_interval_ms = 99999999999999` killed the
listener at its first idle wait, and `retry_initial_ms = 99999999999999999999` at its
first Redis outage (OverflowError in select()); `scan_count = 99999999999999999999`
was accepted by `check`, and every TRUNCATE's sweep then failed ('value is not an
integer or out of range'), its keys left in Redis.
"""

from __future__ import annotations

import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import run_cli
from tests.support.servers import free_port

pytestmark = pytest.mark.servers

TABLES = {"public.users": ["user:{id}"]}


@pytest.mark.parametrize(
    ("setting", "value", "command"),
    [
        ("connect_timeout_s", float("inf"), "check"),
        ("redis_timeout_s", 1e300, "check"),
        ("redis_timeout_s", float("inf"), "run"),
        ("poll_interval_ms", 99_999_999_999_999, "run"),
        ("retry_initial_ms", 99_999_999_999_999_999_999, "run"),
        ("scan_count", 99_999_999_999_999_999_999, "check"),
    ],
)
def test_an_out_of_range_number_is_a_configuration_error(
    env: Env, setting: str, value: object, command: str
) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    assert main(["install", "--config", str(env.config(TABLES))]) == 0
    settings: dict[str, object] = {setting: value}
    if setting == "retry_initial_ms":
        # A back-off only sleeps once something is down: Redis, here.
        settings["retry_max_ms"] = value
        env.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    config = env.config(TABLES, name="bad.toml", **settings)
    result = run_cli(command, "--config", str(config))
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.returncode == 2, text
    assert f"- {setting}: Input should be less than or equal to" in text, text
