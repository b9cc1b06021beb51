"""Sink: where invalidations go (Redis)."""

from cdc_invalidator.sink.redis_sink import RedisSink

__all__ = ["RedisSink"]
