"""How far back a Redis restart can take its data, from the servers' persistence settings
(Sink.persistence()): the window a replay deletes again."""

from __future__ import annotations

from collections.abc import Sequence

from cdc_invalidator.durations import format_duration
from cdc_invalidator.settings import REPLAY_MARGIN_S
from cdc_invalidator.sink import Persistence

# What CONFIG GET cannot tell: the window when it is refused (managed services, ACLs).
UNKNOWN_PERSISTENCE_S = 3600.0
# Added to every window (settings.py holds it: replay_history keeps it too).
MARGIN_S = REPLAY_MARGIN_S


def persistence_window(servers: Sequence[Persistence]) -> tuple[float, str]:
    """How far back a restart can take the data of these servers (Sink.persistence()),
    and why we think so: the longest of theirs (each restarts from its own files)."""
    return max((_window(server) for server in servers), key=lambda w: w[0])


def _window(server: Persistence) -> tuple[float, str]:
    if server.refused is not None:
        return UNKNOWN_PERSISTENCE_S, (
            f"CONFIG GET refused ({server.refused}): assumed "
            f"{format_duration(UNKNOWN_PERSISTENCE_S)}; set replay_window"
        )
    config = server.config
    if config.get("appendonly") == "yes":
        fsync = config.get("appendfsync", "everysec")
        # always: every write is on disk; everysec: up to 1 s (2 s when the disk lags);
        # no: whenever the kernel flushes (30 s on Linux).
        lost = {"always": 0.0, "everysec": 2.0}.get(fsync, 30.0)
        return lost, f"AOF with appendfsync {fsync}"
    numbers = config.get("save", "").split()
    periods = [float(n) for n in numbers[0::2] if n.isdigit()]
    if periods:
        # A snapshot is taken at the latest after the longest period (once anything
        # changed at all): an older one cannot come back (but for the time a BGSAVE
        # takes to write it, of the data of its fork: durability.py reaches back to that
        # fork, from what INFO persistence said at the checks).
        return max(periods), f"RDB snapshots (save {config['save']!r})"
    # Without persistence configured Redis still loads a dump.rdb it finds as it
    # starts (a backup restored by hand, an old SAVE's), and a replica loads its
    # master's in a full sync: of an age nobody can tell (a promoted replica may have
    # lagged). Only a server that says it loaded no keys came back empty.
    if server.loaded_keys == 0:
        return 0.0, "no persistence: the server loaded no keys from an RDB file"
    loaded = (
        "cannot tell whether it loaded keys from an RDB file (Redis before 7.0)"
        if server.loaded_keys is None
        else f"loaded {server.loaded_keys} keys from an RDB file (as it started, or "
        "in a replica's full sync)"
    )
    return UNKNOWN_PERSISTENCE_S, (
        f"no persistence configured, but the server {loaded}: assumed "
        f"{format_duration(UNKNOWN_PERSISTENCE_S)}; set replay_window"
    )
