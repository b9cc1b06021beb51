"""Deletes whose confirmation Redis may give with the next call's (Sink.delete_routed
`later`: a streamed transaction's shares before its last), against a real Redis: read
by the next call, sent again when their connection dies first, and confirmed in every
logical database before a call that confirms returns. The runner's side (the last share
confirms before it acknowledges) is in test_runner; a streamed statement end to end in
test_bulk_logical."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from cdc_invalidator.mapping import Invalidation
from cdc_invalidator.sink import RedisSink
from cdc_invalidator.sink.redis_sink import OWED_SENDS
from tests.support.servers import RedisServer

pytestmark = pytest.mark.servers


@pytest.fixture
def rd(own_redis: RedisServer) -> Iterator[redis.Redis]:
    client = own_redis.client()
    client.flushall()
    yield client
    client.execute_command("CLIENT", "UNPAUSE")
    client.flushall()
    client.close()


def cached(client: redis.Redis, prefix: str, n: int = 1200) -> set[str]:
    keys = {f"{prefix}:{i}" for i in range(n)}
    client.mset(dict.fromkeys(keys, "v"))
    return keys


def test_deletes_confirmed_later_are_confirmed_by_a_later_call(rd: redis.Redis) -> None:
    sink = RedisSink(rd, unlink_chunk=500)
    shares = [cached(rd, str(n), 1200 + n) for n in range(OWED_SENDS + 2)]
    # Sent, not waited for: a count comes with the call that reads their replies, once
    # more than OWED_SENDS calls' replies are unread.
    counts = [sink.delete_routed({None: Invalidation(s)}, later=True) for s in shares[:-1]]
    assert counts == [0] * OWED_SENDS + [len(shares[0])]
    last = sink.delete_routed({None: Invalidation(shares[-1])})
    assert last == sum(len(s) for s in shares[1:])
    assert rd.dbsize() == 0
    # Nothing is left owed: the next call reads only its own replies.
    again = cached(rd, "d", 10)
    assert sink.delete_routed({None: Invalidation(again)}) == len(again)


def test_deletes_owed_on_a_connection_that_died_are_sent_again(
    rd: redis.Redis, own_redis: RedisServer
) -> None:
    """Redis never ran them (paused, then the connection killed with them in its
    buffer): the next call sends them again before its own, every call's owed."""
    sink = RedisSink(rd, unlink_chunk=500)
    owed = [cached(rd, str(n), 1200 + n) for n in range(OWED_SENDS)]
    after = cached(rd, "b")
    admin = own_redis.client()
    admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    for keys in owed:
        assert sink.delete_routed({None: Invalidation(keys)}, later=True) == 0
    killed = admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert killed >= 1
    admin.execute_command("CLIENT", "UNPAUSE")
    every = set().union(*owed)
    assert rd.exists(*every) == len(every), "the UNLINKs died with their connection"
    admin.execute_command("CONFIG", "RESETSTAT")
    # The dead connection fails on its first use; the retry sends them all, once each.
    assert sink.delete_routed({None: Invalidation(after)}) == len(every) + len(after)
    sent = admin.info("commandstats")["cmdstat_unlink"]["calls"]
    assert sent == sum(-(-len(keys) // 500) for keys in [*owed, after])
    assert rd.dbsize() == 0
    admin.close()


def test_a_call_that_confirms_reads_every_database_owed(
    rd: redis.Redis, own_redis: RedisServer
) -> None:
    sink = RedisSink(rd, unlink_chunk=500)
    other = own_redis.client(db=3)
    other.flushdb()
    there = cached(other, "t")
    here = cached(rd, "h", 10)
    assert sink.delete_routed({3: Invalidation(there)}, later=True) == 0
    # The last share has keys of database 0 only: database 3's owed are read all the same.
    assert sink.delete_routed({None: Invalidation(here)}) == len(here) + len(there)
    assert other.dbsize() == 0
    assert sink.delete_routed({}) == 0  # (the runner's call to confirm: nothing left)
    other.close()


def test_a_health_check_due_while_replies_are_owed_does_not_read_one_as_its_pong(
    own_redis: RedisServer,
) -> None:
    """A redis_url with health_check_interval has redis-py PING an idle connection before
    its next send: with UNLINK replies owed on it, the PING's answer would be one of them
    (and every reply after it one off). The check waits until nothing is owed."""
    client = own_redis.client(health_check_interval=3600)
    client.flushall()
    sink = RedisSink(client, unlink_chunk=500)
    owed, after = cached(client, "a"), cached(client, "b", 700)
    assert sink.delete_routed({None: Invalidation(owed)}, later=True) == 0
    conn = sink._kept.get()
    assert conn is not None
    conn.next_health_check = -1  # idle past the interval: a check is due
    assert sink.delete_routed({None: Invalidation(after)}) == len(owed) + len(after)
    again = cached(client, "c", 3)
    assert sink.delete_routed({None: Invalidation(again)}) == len(again)  # in step
    assert client.dbsize() == 0
    client.close()


def test_owed_deletes_on_a_connection_closed_by_another_hand_are_sent_again(
    own_redis: RedisServer,
) -> None:
    """The kept connection closed outside the sink (the pool's disconnect, a client's
    close) with replies owed on it: the next send connects again and sends them again,
    rather than reading its own replies as theirs."""
    client = own_redis.client()
    client.flushall()
    admin = own_redis.client()
    sink = RedisSink(client, unlink_chunk=500)
    owed, after = cached(client, "a"), cached(client, "b", 700)
    admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # the UNLINKs never run
    assert sink.delete_routed({None: Invalidation(owed)}, later=True) == 0
    conn = sink._kept.get()  # the loop's connection (this thread keeps it)
    assert conn is not None
    conn.disconnect()
    admin.execute_command("CLIENT", "UNPAUSE")
    connections = admin.info("stats")["total_connections_received"]
    sink.delete_routed({None: Invalidation(after)})
    # One new connection, whose replies were read in step: no read waited for a reply
    # that never came (a timeout, then a retry on another connection).
    assert admin.info("stats")["total_connections_received"] == connections + 1
    assert client.dbsize() == 0
    again = cached(client, "c", 3)
    assert sink.delete_routed({None: Invalidation(again)}) == len(again)
    client.close()
    admin.close()
