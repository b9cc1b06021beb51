"""Replay: delete again what was invalidated recently, when Redis may have brought it back.

Redis that restarts from an RDB snapshot or an AOF that was not fsynced, or a replica
promoted before it received our last UNLINKs, serves keys the listener had deleted:
stale rows again. The listener notices by asking Redis who it is (run_id and
master_replid from INFO) on every reconnect and every redis_check_interval_ms; when the
answer changes, every key invalidated since shortly before the old server was last seen
(less what its persistence can lose) is deleted again, before anything else. The same
replay runs by hand: `cdc-invalidator replay --since 15m`.

What was invalidated is read back from PostgreSQL: the trigger queue's rows (kept for
replay_history after they are processed), or history_v1 in logical mode, decoded as the
listener decodes them (capture/rows.py): a row it would dead-letter is skipped and logged,
since a replay that stopped on it would stop the listener at every start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import redis
import structlog
from redis.cluster import RedisCluster

from cdc_invalidator.capture.rows import Decoded, RowDecoder
from cdc_invalidator.durations import format_duration
from cdc_invalidator.mapping import Mapper
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.sink.auto import Sink
from cdc_invalidator.sink.cluster_sink import primaries

log = structlog.get_logger("cdc_invalidator.replay")

# Events read and deleted per round: bounded memory whatever the window holds.
CHUNK = 20_000
# Skipped rows logged one by one per replay; the rest are counted.
SKIPS_LOGGED = 20
# What CONFIG GET cannot tell: the window when it is refused (managed services, ACLs).
UNKNOWN_PERSISTENCE_S = 3600.0
# Added to every window: the clock of the commit and of the check, a snapshot being
# written while the server went down, and the replication lag of a promoted replica.
MARGIN_S = 5.0


@dataclass(frozen=True, slots=True)
class ReplayResult:
    events: int  # read back from the history
    keys: int  # distinct keys (and patterns) deleted again, per chunk
    existed: int  # how many of them Redis held: what the replay undid
    # Rows, or events, that could not be decoded or no longer map to keys (their table
    # left the configuration): each logged (the first SKIPS_LOGGED), none replayed.
    skipped: int
    seconds: float


def history(
    conn: psycopg.Connection[Any], capture: Literal["trigger", "logical"], since_s: float
) -> Iterator[Decoded]:
    """The events invalidated in the last `since_s` seconds (by the server's clock), in
    chunks, oldest first, with the rows that are no events (the listener dead-lettered
    them, or would have). A server-side cursor: the window may hold millions."""
    query = Q.HISTORY_TRIGGER if capture == "trigger" else Q.HISTORY_LOGICAL
    decoder = RowDecoder()
    with conn.transaction(), conn.cursor(name="cdc_invalidator_replay") as cur:
        cur.execute(query.sql, {"seconds": since_s})
        while rows := cur.fetchmany(CHUNK):
            if capture == "trigger":
                yield decoder.queue_rows(rows)
                continue
            chunk = Decoded()
            for position, text in rows:
                decoded = decoder.history_row(position, text)
                chunk.events += decoded.events
                chunk.dead += decoded.dead
            yield chunk


def replay(
    conn: psycopg.Connection[Any],
    capture: Literal["trigger", "logical"],
    mapper: Mapper,
    sink: Sink,
    since_s: float,
) -> ReplayResult:
    """Delete the keys of every event invalidated in the last `since_s` seconds. A row
    that is no event, or an event that maps to no keys, is skipped and logged: the
    others are replayed all the same."""
    started = time.monotonic()
    events = keys = existed = 0
    skips = _Skips("queue_v1" if capture == "trigger" else "history_v1")
    for chunk in history(conn, capture, since_s):
        for position, reason in chunk.dead:
            skips.add(position, reason)
        works, failed = mapper.map_all(chunk.events)
        for event, exc in failed:
            skips.add(event.position, str(exc))
        events += len(chunk.events)
        keys += sum(len(w) for w in works.values())
        existed += sink.delete_routed(works)
    skips.close()
    return ReplayResult(events, keys, existed, skips.count, time.monotonic() - started)


class _Skips:
    """A replay's skipped rows: counted, and logged up to SKIPS_LOGGED (a table that left
    the configuration can leave a million history rows behind)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.count = 0

    def add(self, position: int, reason: str) -> None:
        self.count += 1
        if self.count <= SKIPS_LOGGED:
            log.warning("replay_skipped", source=self.source, row=position, reason=reason)

    def close(self) -> None:
        if self.count > SKIPS_LOGGED:
            log.warning(
                "replay_skips_not_logged",
                source=self.source,
                skipped=self.count,
                not_logged=self.count - SKIPS_LOGGED,
            )


def persistence_window(client: redis.Redis | RedisCluster) -> tuple[float, str]:
    """How far back a restart of this server can take its data, and why we think so.
    A cluster: the longest of its primaries' (each restarts from its own files)."""
    if isinstance(client, RedisCluster):
        nodes = [client.get_redis_connection(node) for node in primaries(client)]
        return max((persistence_window(node) for node in nodes), key=lambda w: w[0])
    try:
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save"):
            for key, value in client.config_get(name).items():
                config[_text(key)] = _text(value)
    except redis.ResponseError as exc:  # NOPERM, or CONFIG renamed away
        return UNKNOWN_PERSISTENCE_S, (
            f"CONFIG GET refused ({exc}): assumed {format_duration(UNKNOWN_PERSISTENCE_S)}; "
            "set replay_window"
        )
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
        # changed at all): an older one cannot come back.
        return max(periods), f"RDB snapshots (save {config['save']!r})"
    return 0.0, "no persistence: a restart comes back empty"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class IdentityStore:
    """The Redis identity saved in PostgreSQL (redis_identity_v1)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def load(self) -> tuple[str, float] | None:
        """(identity, seconds since it was saved) or None before the first save."""
        row = self._conn.execute(Q.LOAD_REDIS_IDENTITY.sql).fetchone()
        return (row[0], max(0.0, row[1])) if row else None

    def save(self, identity: str) -> None:
        self._conn.execute(Q.SAVE_REDIS_IDENTITY.sql, {"identity": identity})


class RedisWatch:
    """Asks Redis who it is; replays the window when it is somebody else.

    `window_s` None: derived from the new server's persistence settings."""

    def __init__(  # noqa: PLR0913 - every option is keyword-only
        self,
        *,
        sink: Sink,
        mapper: Mapper,
        capture: Literal["trigger", "logical"],
        connect: Callable[[], psycopg.Connection[Any]],
        window_s: float | None,
        check_every_s: float,
        second_delete_s: float = 0.0,
    ) -> None:
        self._sink = sink
        self._mapper = mapper
        self._capture = capture
        self._connect = connect
        self._window_s = window_s
        self._check_every_s = check_every_s
        self._known: str | None = None
        self._announced: str | None = None  # the identity a replay was logged for
        self._known_at = 0.0  # monotonic time the known identity was last confirmed
        self._next_check = 0.0
        # second_delete_ms: the second deletes a killed predecessor owed are redone once.
        self._second_delete_s = second_delete_s
        self._predecessor_owed = second_delete_s > 0

    def check(self, force: bool = False) -> ReplayResult | None:
        """The replay done, if one was. Raises what Redis or PostgreSQL raise: the runner
        retries."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return None
        identity = self._sink.identity()
        self._next_check = time.monotonic() + self._check_every_s
        if identity == self._known:
            self._known_at = now
            return None
        result = None
        with self._connect() as conn:
            store = IdentityStore(conn)
            saved = store.load()
            if saved is None or saved[0] == identity:
                if saved is None:
                    store.save(identity)
                    log.info("redis_identity_recorded", identity=identity)
            else:
                # Last seen: the in-memory confirmation, or (a listener restarted while
                # Redis changed) when the old identity was saved.
                gone_s = now - self._known_at if self._known is not None else saved[1]
                result = self._replay(conn, saved[0], identity, gone_s)
                store.save(identity)
            if self._predecessor_owed:
                self._redo_second_deletes(conn)
                self._predecessor_owed = False
        self._known, self._known_at = identity, now
        return result

    def _redo_second_deletes(self, conn: psycopg.Connection[Any]) -> None:
        """The listener before this one may have died owing second deletes (they live
        in memory): delete again what it acknowledged in its last second_delete_ms.
        Logical mode knows when each batch was acknowledged; trigger mode goes by the
        writing transactions' start, which covers it while the listener kept up."""
        query = (
            Q.LAST_ACKNOWLEDGED_TRIGGER
            if self._capture == "trigger"
            else Q.LAST_ACKNOWLEDGED_LOGICAL
        )
        row = conn.execute(query.sql).fetchone()
        if row is None or row[0] is None:
            return  # nothing acknowledged yet
        since_s = max(0.0, row[0]) + self._second_delete_s + MARGIN_S
        result = replay(conn, self._capture, self._mapper, self._sink, since_s)
        log.info(
            "second_deletes_redone",
            since_s=round(since_s, 1),
            events=result.events,
            existed=result.existed,
            detail="the previous listener may have stopped owing these",
        )

    def _replay(
        self, conn: psycopg.Connection[Any], previous: str, current: str, gone_s: float
    ) -> ReplayResult | None:
        if self._window_s == 0:
            log.warning("redis_changed", previous=previous, current=current, replay="off")
            return None
        if self._window_s is None:
            lost_s, why = persistence_window(self._sink.client)
        else:
            lost_s, why = self._window_s, "replay_window"
        since_s = gone_s + lost_s + MARGIN_S
        if self._announced != current:  # once, not on every retry of a failed replay
            self._announced = current
            log.warning(
                "redis_changed",
                previous=previous,
                current=current,
                replay_since_s=round(since_s, 1),
                window=why,
                detail="Redis restarted or failed over: deleting again every key invalidated "
                "since before the old server was last seen",
            )
        result = replay(conn, self._capture, self._mapper, self._sink, since_s)
        log.info(
            "replay_done",
            events=result.events,
            keys=result.keys,
            existed=result.existed,
            skipped=result.skipped,
            duration_s=round(result.seconds, 3),
        )
        return result
