"""Sink: where invalidations go (one Redis server, through Sentinel, or a Redis Cluster)."""

from cdc_invalidator.sink.auto import AutoSink, Sink, connect_sink, open_sink
from cdc_invalidator.sink.cluster_sink import ClusterSink
from cdc_invalidator.sink.redis_sink import RedisSink

__all__ = ["AutoSink", "ClusterSink", "RedisSink", "Sink", "connect_sink", "open_sink"]
