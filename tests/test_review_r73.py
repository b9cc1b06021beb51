"""Review r73: NOPERM on the pipelined (`later`) path."""

from __future__ import annotations

import pytest
from redis.exceptions import NoPermissionError

from cdc_invalidator.mapping import Invalidation
from cdc_invalidator.sink import RedisSink, connect_sink
from tests.support.servers import RedisServer
from tests.test_acl_refusals import _user


def test_a_refusal_read_by_a_later_call_names_its_key(own_redis: RedisServer) -> None:
    admin, url = _user(own_redis, "narrow_later")
    admin.mset({"order:1": "b", "user:1": "a", "user:2": "c", "user:3": "d"})
    sink = connect_sink(url)
    assert isinstance(sink, RedisSink)
    # Shares of a streamed transaction: replies read by later calls (OWED_SENDS = 2).
    sink.delete_routed({None: Invalidation(keys={"order:1"})}, later=True)
    sink.delete_routed({None: Invalidation(keys={"user:1"})}, later=True)
    with pytest.raises(NoPermissionError) as refused:
        sink.delete_routed({None: Invalidation(keys={"user:2"})}, later=True)
    assert "'order:1'" in str(refused.value), str(refused.value)
    sink.close()


def test_a_refusal_read_by_confirm_names_its_key(own_redis: RedisServer) -> None:
    admin, url = _user(own_redis, "narrow_confirm")
    admin.mset({"order:1": "b"})
    sink = connect_sink(url)
    assert isinstance(sink, RedisSink)
    sink.delete_routed({None: Invalidation(keys={"order:1"})}, later=True)
    with pytest.raises(NoPermissionError) as refused:
        sink.confirm()
    assert "'order:1'" in str(refused.value), str(refused.value)
    sink.close()
