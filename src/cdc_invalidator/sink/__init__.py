"""Sink: where invalidations go (one Redis server, through Sentinel, or a Redis Cluster).

Outside this package the listener knows Redis through protocol.py's names (re-exported
here) and RedisOptions: the runner, replay, `check` and the command line import nothing
from redis-py.
"""

from cdc_invalidator.sink.auto import AutoSink, connect_sink, open_sink
from cdc_invalidator.sink.cluster_sink import ClusterSink
from cdc_invalidator.sink.connect import MasterWatch, RedisOptions, url_db
from cdc_invalidator.sink.protocol import (
    REDIS_ERRORS,
    REDIS_REFUSED,
    REDIS_UNAVAILABLE,
    Persistence,
    ServerState,
    Sink,
    SweepSink,
    SweepStopped,
)
from cdc_invalidator.sink.redis_sink import RedisSink

__all__ = [
    "REDIS_ERRORS",
    "REDIS_REFUSED",
    "REDIS_UNAVAILABLE",
    "AutoSink",
    "ClusterSink",
    "MasterWatch",
    "Persistence",
    "RedisOptions",
    "RedisSink",
    "ServerState",
    "Sink",
    "SweepSink",
    "SweepStopped",
    "connect_sink",
    "open_sink",
    "url_db",
]
