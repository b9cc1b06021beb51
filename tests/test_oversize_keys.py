"""A key longer than Redis's proto-max-bulk-len (sink/oversize.py): Redis answers an
UNLINK naming one with a protocol error and closes the connection, every time, so such
a key is left out of the UNLINKs (it cannot be cached: SET is refused it too) and
logged, and the rest of its batch is deleted. Against a real Redis with the least limit
it takes (1 MiB); the cluster's side is in test_cluster."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from cdc_invalidator.mapping import Invalidation
from cdc_invalidator.sink import RedisSink
from cdc_invalidator.sink.oversize import LEAST_LIMIT, bulk_limit, storable
from tests.support.env import Env
from tests.support.faults import bulk_limit_at, cache, keys_of, setup_users
from tests.support.listener import Spawn, stop_listener
from tests.support.logs import captured_logs
from tests.support.servers import RedisServer
from tests.support.waits import wait_until

pytestmark = pytest.mark.servers

PASSWORD = "pw-noconfig"  # noqa: S105 - a throwaway ACL user's, on a test server
LONG = "x" * (LEAST_LIMIT + 10)  # past the limit as a key, with any prefix


@pytest.fixture
def least_limit(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """own_redis, emptied, with proto-max-bulk-len at its least (as it was after)."""
    client = own_redis.client()
    client.flushall()
    with bulk_limit_at(LEAST_LIMIT, client):
        yield client
    client.flushall()
    client.close()


def test_an_unlink_leaves_out_a_key_redis_refuses_and_deletes_the_rest(
    least_limit: redis.Redis,
) -> None:
    r = least_limit
    short = [f"k:{i}" for i in range(1200)]
    r.mset(dict.fromkeys(short, "v"))
    with pytest.raises(redis.RedisError, match="invalid bulk length"):
        r.set(f"doc:{LONG}", "v")  # what makes such a key impossible to cache
    sink = RedisSink(r, unlink_chunk=500)
    with captured_logs() as logs:
        existed = sink.delete_routed(
            {None: Invalidation({*short[:600], f"doc:{LONG}", *short[600:]})}
        )
    assert existed == len(short)
    assert r.dbsize() == 0
    [line] = [e for e in logs if e["event"] == "key_too_long_for_redis"]
    assert line["key_bytes"] == len(LONG) + 4
    assert line["proto_max_bulk_len"] == LEAST_LIMIT
    assert line["key_starts"] == f"doc:{LONG}"[:64]
    # The connection it kept is in step: the next batch goes through it as usual.
    r.set("after", "v")
    assert sink.delete_routed({None: Invalidation({"after"})}) == 1
    sink.close()


def test_keys_under_the_limit_in_a_command_past_it_are_all_deleted(
    least_limit: redis.Redis,
) -> None:
    """500 keys of 3 kB: one UNLINK of 1.5 MB, past the least limit, though no key is.
    Redis takes it (the limit is per argument); nothing is left out, nothing logged."""
    r = least_limit
    keys = [f"{i}:{'y' * 3000}" for i in range(500)]
    r.mset(dict.fromkeys(keys, "v"))
    sink = RedisSink(r, unlink_chunk=500)
    with captured_logs() as logs:
        assert sink.delete_routed({None: Invalidation(set(keys))}) == len(keys)
    assert r.dbsize() == 0
    assert not [e for e in logs if e["event"] == "key_too_long_for_redis"]
    sink.close()


@contextmanager
def config_refused(r: redis.Redis, url: str) -> Iterator[str]:
    """`url` for an ACL user of `r`'s server that may not run CONFIG (a managed Redis's
    way), for a while."""
    r.acl_setuser(
        "noconfig",
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["*"],
        commands=["+@all", "-config"],
    )
    try:
        yield url.replace("redis://", f"redis://noconfig:{PASSWORD}@", 1)
    finally:
        r.acl_deluser("noconfig")


def test_the_limit_is_the_servers_or_unknown_where_config_is_refused(
    least_limit: redis.Redis, own_redis: RedisServer
) -> None:
    assert bulk_limit(least_limit) == LEAST_LIMIT
    with config_refused(least_limit, own_redis.url) as url:
        limited = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.config_get("proto-max-bulk-len")
        assert bulk_limit(limited) is None
        limited.close()


def test_where_the_limit_is_unknown_each_long_key_is_asked_about(
    least_limit: redis.Redis, own_redis: RedisServer
) -> None:
    """A key longer than the least limit is left out only if Redis refuses it: under a
    higher limit it can be cached, and its UNLINK is sent. The client's pool is left
    with no connection Redis closed."""
    with config_refused(least_limit, own_redis.url) as url:
        limited = redis.Redis.from_url(url)
        assert storable(["short", LONG], None, limited) == ["short"]
        assert limited.ping()
        least_limit.config_set("proto-max-bulk-len", 4 * LEAST_LIMIT)
        assert storable(["short", LONG], None, limited) == ["short", LONG]
        limited.set(LONG, "cached")  # (so it can be cached, and must be deleted)
        assert limited.unlink(LONG) == 1
        limited.close()


def test_a_probe_reset_for_another_reason_is_no_refusal(
    least_limit: redis.Redis, own_redis: RedisServer
) -> None:
    """A key Redis takes, whose probe is cut for another reason (here Redis evicting
    clients past maxmemory-clients, which the probe's 1 MiB query buffer passes; a
    proxy would do the same): the first draft took two such resets for a refusal and
    left the key, which an app had cached, out of the UNLINK (a review). It raises
    now, and the batch is retried."""
    least_limit.config_set("proto-max-bulk-len", 4 * LEAST_LIMIT)
    least_limit.client_no_evict("on")
    least_limit.set(LONG, "cached")
    least_limit.config_set("maxmemory-clients", LEAST_LIMIT)
    try:
        with config_refused(least_limit, own_redis.url) as url:
            limited = redis.Redis.from_url(url)
            with pytest.raises(redis.ConnectionError):
                storable([LONG], None, limited)
            limited.close()
    finally:
        least_limit.config_set("maxmemory-clients", 0)
    assert least_limit.exists(LONG) == 1


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("config_get", ["allowed", "refused"])
def test_a_change_whose_key_is_too_long_does_not_hold_its_batch_back(
    env: Env, spawn: Spawn, config_get: str
) -> None:
    """A row's new email, 1 MiB long, makes a key Redis refuses: the listener used to
    retry it as redis_unavailable for good, every other key of the batch left cached.
    Where CONFIG GET is refused, the limit is not known: each key longer than the least
    limit is asked about on its own (it was sent, and held every later change)."""
    config = setup_users(env, rows=3)
    r = env.redis()
    with bulk_limit_at(LEAST_LIMIT, r), config_refused(r, env.redis_url) as url:
        if config_get == "refused":
            config.write_text(config.read_text().replace(env.redis_url, url))
        listener = spawn(config)
        cache(r, [1, 2, 3])
        with env.connect() as conn, conn.transaction():  # one batch
            conn.execute("UPDATE users SET email = %s WHERE id = 1", [LONG])
            conn.execute("UPDATE users SET email = 'two@new' WHERE id = 2")
        wait_until(lambda: r.exists(*keys_of(1), *keys_of(2)) == 0, what="both rows' keys deleted")
        assert r.exists(*keys_of(3)) == 2
        # And after it, as usual.
        with env.connect() as conn:
            conn.execute("UPDATE users SET email = 'three@new' WHERE id = 3")
        wait_until(lambda: r.exists(*keys_of(3)) == 0, what="a later change's keys deleted")
        [line, *_] = listener.logged("key_too_long_for_redis")
        assert line["key_bytes"] == len("user:email:") + len(LONG)
        assert not listener.logged("redis_unavailable")
        stop_listener(listener)
