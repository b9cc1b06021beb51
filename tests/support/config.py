"""Config files as a user writes them, with settings fast enough for tests."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

# Test settings: fast polling and back-off so that faults heal within a test's patience.
RETRY_INITIAL_MS, RETRY_MAX_MS = 20, 300
FAST: dict[str, object] = {
    "poll_interval_ms": 200,
    "status_interval_ms": 100,
    "prune_every_ms": 0,
    "retry_initial_ms": RETRY_INITIAL_MS,
    "retry_max_ms": RETRY_MAX_MS,
    "connect_timeout_s": 2,
    "redis_timeout_s": 2,
    # Processed queue rows go at once, as the queue-counting tests expect; the replay
    # tests keep them.
    "replay_history": "0s",
    # No key of the listener's own in Redis, as the tests that count Redis's keys
    # expect; the source mark's tests (a failback, a database renamed back) turn it on.
    "source_mark": False,
}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    path: Path,
    *,
    database_url: str,
    redis_url: str,
    tables: Mapping[str, Sequence[str]],
    **settings: object,
) -> Path:
    """A TOML config file like a user would write; FAST settings unless overridden."""
    lines = [f"database_url = {toml_value(database_url)}", f"redis_url = {toml_value(redis_url)}"]
    for key, value in {**FAST, **settings}.items():
        lines.append(f"{key} = {toml_value(value)}")
    for table, keys in tables.items():
        lines.append(f"[tables.{toml_value(table)}]")
        lines.append(f"keys = {toml_value(list(keys))}")
    path.write_text("\n".join(lines) + "\n")
    return path
