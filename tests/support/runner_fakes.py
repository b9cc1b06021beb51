"""In-memory stand-ins for what the runner is handed, for tests of it that need no
servers (tests/test_runner.py, tests/test_fast_path.py)."""

from __future__ import annotations

from cdc_invalidator.mapping import Routed
from cdc_invalidator.sink import Persistence, ServerState


class RecordingSink:
    """The runner's Sink: records the keys of each delete (sorted). What the runner never
    calls fails."""

    def __init__(self) -> None:
        self.deletes: list[list[str]] = []
        self.pings = 0

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        keys = sorted(k for work in works.values() for k in work.keys)
        self.deletes.append(keys)
        return len(keys)

    def identity(self) -> str:
        return "fake"

    def persistence(self) -> list[Persistence]:
        raise AssertionError("not used by the runner")

    def states(self) -> list[ServerState]:
        raise AssertionError("not used by the runner")

    def ping(self) -> str:
        self.pings += 1  # a standby's, each poll
        return "fake"

    def read_mark(self, key: str) -> str | None:
        raise AssertionError("not used by the runner")

    def write_mark(self, key: str, value: str) -> None:
        raise AssertionError("not used by the runner")

    def close(self) -> None:
        pass
