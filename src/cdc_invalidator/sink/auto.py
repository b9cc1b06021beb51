"""Open the sink for the configured Redis: one server or a Redis Cluster, told by the
server.

`redis_url` may name any node of a cluster. At first use the sink asks that server
`INFO cluster`; with `cluster_enabled:1` it becomes a ClusterSink (redis-py's
RedisCluster discovers the other nodes from it), otherwise a RedisSink. The question is
put at first use, not when the listener starts: Redis may be down then, and the runner
retries with back-off as for any other Redis outage. Through Sentinel there is no
cluster to detect: the sink is a RedisSink for the master the sentinels name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import redis
import structlog
from redis.cluster import RedisCluster

from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.mapping import Invalidation, Routed
from cdc_invalidator.sink.cluster_sink import ClusterSink, primaries
from cdc_invalidator.sink.connect import MasterWatch, RedisOptions, redis_client, url_db
from cdc_invalidator.sink.protocol import Persistence, ServerState
from cdc_invalidator.sink.redis_sink import RedisSink

log = structlog.get_logger("cdc_invalidator.sink")


def open_sink(
    options: RedisOptions | str,
    *,
    unlink_chunk: int = 500,
    scan_count: int = 1000,
    follow_master: MasterWatch | None = None,
) -> AutoSink:
    """The sink for `options` (or a bare URL); nothing is connected until first use.
    `follow_master`: the process's, shared with its other sinks (through Sentinel)."""
    if isinstance(options, str):
        options = RedisOptions(options)
    return AutoSink(
        options, unlink_chunk=unlink_chunk, scan_count=scan_count, follow_master=follow_master
    )


def connect_sink(
    options: RedisOptions | str,
    *,
    unlink_chunk: int = 500,
    scan_count: int = 1000,
    follow_master: MasterWatch | None = None,
) -> RedisSink | ClusterSink:
    """Connect now and ask the server whether it is a cluster node."""
    if isinstance(options, str):
        options = RedisOptions(options)
    client = redis_client(options)
    if options.sentinels:
        return RedisSink(
            client, unlink_chunk=unlink_chunk, scan_count=scan_count, follow_master=follow_master
        )
    db = url_db(options.url)
    only_db0 = f"redis_url selects database {db}, but a Redis Cluster has only database 0"
    try:
        info: dict[str, Any] = client.info("cluster")
    except BaseException as exc:
        client.close()
        # A cluster node refuses the SELECT that a database other than 0 sends first.
        if db and isinstance(exc, redis.ResponseError) and "cluster mode" in str(exc):
            raise Fatal(only_db0) from exc
        raise
    if not info.get("cluster_enabled"):
        log.info("redis_connected", mode="single")
        return RedisSink(client, unlink_chunk=unlink_chunk, scan_count=scan_count)
    client.close()
    if db:
        raise Fatal(only_db0)
    cluster = RedisCluster.from_url(options.url, **options.client_kwargs())
    log.info("redis_connected", mode="cluster", primaries=len(primaries(cluster)))
    return ClusterSink(cluster, unlink_chunk=unlink_chunk, scan_count=scan_count)


class AutoSink:
    """A RedisSink or a ClusterSink, chosen by connect_sink() at first use; a failed
    connection is raised to the caller and tried again at the next use. A Sink, and
    the concrete sinks' delete(), unlink() and sweep() besides."""

    def __init__(
        self,
        options: RedisOptions,
        *,
        unlink_chunk: int,
        scan_count: int,
        follow_master: MasterWatch | None = None,
    ) -> None:
        self._options = options
        self._unlink_chunk = unlink_chunk
        self._scan_count = scan_count
        self._follow_master = follow_master
        self._sink: RedisSink | ClusterSink | None = None

    @property
    def sink(self) -> RedisSink | ClusterSink:
        if self._sink is None:
            self._sink = connect_sink(
                self._options,
                unlink_chunk=self._unlink_chunk,
                scan_count=self._scan_count,
                follow_master=self._follow_master,
            )
        return self._sink

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        return self.sink.delete_routed(works, later)

    def sweep_routed(self, works: Routed, stopped: Callable[[], bool] | None = None) -> int:
        return self.sink.sweep_routed(works, stopped)

    def delete(self, work: Invalidation) -> int:
        return self.sink.delete(work)

    def unlink(self, keys: Collection[str]) -> int:
        return self.sink.unlink(keys)

    def sweep(self, patterns: Collection[str], stopped: Callable[[], bool] | None = None) -> int:
        return self.sink.sweep(patterns, stopped)

    def identity(self) -> str:
        return self.sink.identity()

    def persistence(self) -> list[Persistence]:
        return self.sink.persistence()

    def states(self) -> list[ServerState]:
        return self.sink.states()

    def ping(self) -> str:
        return self.sink.ping()

    def read_mark(self, key: str) -> str | None:
        return self.sink.read_mark(key)

    def write_mark(self, key: str, value: str) -> None:
        self.sink.write_mark(key, value)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
