"""What the rest of cdc-invalidator sees of Redis: the Sink protocol, what it answers
with, and the errors it raises. No redis-py type crosses this line: the runner, replay,
`check` and the command line know Redis through these names only, whatever the server
(one, through Sentinel, a cluster) and whatever redis-py does inside sink/.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.exceptions import RedisClusterException

from cdc_invalidator.mapping import Routed

# Errors after which the same deletes will work once Redis is back: retry them with
# back-off. Error replies count too: READONLY (a replica that was a master), LOADING,
# NOREPLICAS, MISCONF, NOPERM from an ACL being fixed... UNLINK and SCAN cannot fail
# because of one event's keys, so no reply is a reason to drop a batch or to exit.
# ConnectionError covers a refused password (AuthenticationError: a secret being
# rotated), a TLS handshake that failed, and Sentinel's MasterNotFoundError during a
# failover; READONLY from a demoted master is a ResponseError (and, through Sentinel,
# a ConnectionError that makes the next connection ask for the new master).
# Redis Cluster: CLUSTERDOWN, TRYAGAIN, MOVED/ASK left over are ResponseErrors too;
# ClusterError is redis-py giving up on redirections, RedisClusterException a slot table
# it could not read or that does not cover every slot (a failover, a resharding).
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ResponseError,
    redis.exceptions.ClusterError,
    RedisClusterException,
)

# Among those, Redis refusing who we are or what we may do: the listener waits (a secret
# or an ACL being fixed); a command run by hand says so at once.
REDIS_REFUSED: tuple[type[Exception], ...] = (
    redis.AuthenticationError,
    redis.exceptions.NoPermissionError,
)

# Everything a sink can raise from Redis or redis-py (REDIS_UNAVAILABLE and the rest):
# what a command that talks to Redis once ends with, in one line.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


# A pattern no key matches (no application key holds a NUL and this text): what a probe
# SCAN asks for.
NO_KEY = "\0cdc-invalidator-probe"


class SweepStopped(Exception):
    """A sweep given up before it completed (the listener is stopping): nothing it
    stood for was acknowledged, and it comes again."""


def raise_if_stopped(stopped: Callable[[], bool] | None) -> None:
    """Between two SCAN pages of a sweep: give it up if the listener is stopping."""
    if stopped is not None and stopped():
        raise SweepStopped("the sweep was stopped before it completed")


@dataclass(frozen=True, slots=True)
class Persistence:
    """One server's persistence settings as CONFIG GET reads them (`appendonly`,
    `appendfsync`, `save`), or why they could not be read (`refused`: NOPERM, CONFIG
    renamed away); and how many keys it loaded from a file when it started (INFO
    persistence's `rdb_last_load_keys_loaded`; None where Redis does not say, before
    7.0). What they mean for a restart is replay's business."""

    config: Mapping[str, str]
    refused: str | None = None
    loaded_keys: int | None = None


@dataclass(frozen=True, slots=True)
class ServerState:
    """One server's INFO server, persistence and replication, read at each identity
    check: who it is, and how much of its data a restart, or a replica taking over,
    would bring back (redis_guard/durability.py)."""

    run_id: str
    master: bool  # role: master (a replica takes no deletes, or keeps them to itself)
    replid: str  # master_replid
    offset: int  # master_repl_offset: how far its replication stream has gone
    # After a promotion (or a restart from a dump a master with replicas saved): the
    # history it continued (master_replid2) and the offset where its own began
    # (second_repl_offset; -1: none). It holds that history's writes before that offset,
    # and none after.
    replid2: str
    second_offset: int
    aof: bool  # aof_enabled
    aof_ok: bool  # aof_last_write_status: ok
    # Its last successful RDB save: the time of the data it holds (rdb_last_save_time,
    # less the BGSAVE's duration: it writes the data of its fork), unix time on the
    # listener's clock
    saved_at: float
    unsaved: int  # rdb_changes_since_last_save
    saves: int | None  # rdb_saves since it started (None: Redis before 7.0 does not say)
    loaded_keys: int | None  # rdb_last_load_keys_loaded (None: before 7.0)
    # When it started (uptime_in_seconds), unix time on the listener's clock; None: not
    # said. What it loaded then is older.
    started_at: float | None = None

    @property
    def identity(self) -> str:
        """`run_id/master_replid`: either changing means its data may be older."""
        return f"{self.run_id}/{self.replid}"


def as_text(value: bytes | str | None) -> str | None:
    """A GET's reply as text (the clients are made without decode_responses)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def identity_of(states: Sequence[ServerState]) -> str:
    """The identities of a sink's servers (every primary of a cluster), sorted, joined."""
    return ",".join(sorted(state.identity for state in states))


class Sink(Protocol):
    """What the runner, replay and `check` need from Redis (RedisSink, ClusterSink,
    AutoSink). Every method raises what Redis raises (REDIS_UNAVAILABLE: retry later)."""

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        """Delete each Redis database's keys and sweep its patterns; how many keys
        existed. Returns only once Redis confirmed all of it: the caller acknowledges
        after.

        `later`: for a batch whose acknowledgement records nothing (a streamed
        transaction's share before its last): Redis may confirm its deletes with a later
        call's (the first without `later` waits for all of them), so that Redis deletes
        one share while the loop prepares the next. Those deletes are sent again if
        their confirmation is lost with a connection, and the count returned is of what
        was confirmed."""
        ...

    def identity(self) -> str:
        """Who the server is (every primary of a cluster): a new value means its data may
        be older than ours (a restart, a failover)."""
        ...

    def persistence(self) -> list[Persistence]:
        """The persistence settings of every server that holds our keys (every primary
        of a cluster: each restarts from its own files)."""
        ...

    def states(self) -> list[ServerState]:
        """The state of every server that holds our keys (every primary of a cluster);
        identity() is identity_of() them."""
        ...

    def ping(self) -> str:
        """Ping every server deletes go to, and SCAN one page there (a TRUNCATE's sweep
        needs SCAN: an ACL without it held every change behind the first sweep, while
        `check` said all was well); say what answered, for `check`."""
        ...

    def read_mark(self, key: str) -> str | None:
        """The text of one key of the listener's own (redis_guard/source.py), in the
        database redis_url names; None where there is none."""
        ...

    def write_mark(self, key: str, value: str) -> None:
        """Set that key to `value`, without expiry."""
        ...

    def close(self) -> None: ...


class SweepSink(Protocol):
    """What the sweeper (sweeper.py) needs: RedisSink, ClusterSink, AutoSink."""

    def sweep_routed(self, works: Routed, stopped: Callable[[], bool] | None = None) -> int:
        """Sweep each Redis database's patterns, all of them in one SCAN pass; how many
        keys existed. `stopped` is asked between SCAN pages (True: SweepStopped)."""
        ...

    def close(self) -> None: ...
