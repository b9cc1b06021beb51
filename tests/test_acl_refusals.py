"""An ACL user that may not delete every key the mapping makes: each
refusal names the keys refused (and a sweep's pattern), and nothing is acknowledged.

Redis answers such an UNLINK "NOPERM this user has no permissions to access one of the
keys used as arguments", naming none: the listener said only that, in one
`redis_unavailable` (a sweep: `sweep_failed`) line, while the change waited for good.
Real redis-server processes; every wait is on an event, never on a clock.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError

from cdc_invalidator.cli import main
from cdc_invalidator.mapping import Invalidation
from cdc_invalidator.sink import RedisSink, connect_sink
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.listener import ListenerProcess
from tests.support.servers import RedisServer
from tests.support.waits import wait_until

# docs/redis.md's minimal ACL, keys narrowed to user:*.
USER_KEYS_ONLY = ["on", ">pw", "~user:*", "resetchannels", "-@all", "+unlink", "+scan"]
USER_KEYS_ONLY += ["+info", "+ping", "+client|setname"]


def _user(server: RedisServer, name: str) -> tuple[redis.Redis, str]:
    admin = server.client(decode_responses=True)
    admin.execute_command("ACL", "SETUSER", name, "reset", *USER_KEYS_ONLY)
    return admin, server.url.replace("redis://", f"redis://{name}:pw@")


def test_an_unlink_refused_names_its_key_and_deletes_the_rest(own_redis: RedisServer) -> None:
    admin, url = _user(own_redis, "narrow")
    admin.mset({"user:1": "a", "order:1": "b", "user:2": "c"})
    sink = connect_sink(url)
    assert isinstance(sink, RedisSink)
    with pytest.raises(NoPermissionError) as refused:
        sink.unlink(["user:1", "order:1", "user:2"])
    message = str(refused.value)
    assert "refused UNLINK of 'order:1';" in message, message  # (and of no other)
    assert "no permissions to access one of the keys" in message  # (Redis's own words)
    assert admin.exists("order:1") == 1
    assert admin.exists("user:1", "user:2") == 0  # (each alone, while naming it)
    sink.close()


def test_a_sweep_refused_names_the_keys_and_the_pattern(own_redis: RedisServer) -> None:
    admin, url = _user(own_redis, "narrow_sweep")
    admin.mset({"order:1": "b", "user:1:orders": "c", "other:1": "keep"})
    sink = connect_sink(url)
    assert isinstance(sink, RedisSink)
    with pytest.raises(NoPermissionError) as refused:
        sink.sweep(["order:*", "user:*:orders"])
    message = str(refused.value)
    assert "refused UNLINK of 'order:1' (swept for 'order:*');" in message, message
    assert admin.exists("order:1") == 1
    assert admin.exists("user:1:orders") == 0  # (each alone, while naming them)
    assert admin.get("other:1") == "keep"
    sink.close()


@pytest.mark.servers
def test_the_listener_names_the_refused_key_and_acknowledges_nothing(
    env: Env, tmp_path: Path
) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int, total int);"
        "INSERT INTO users VALUES (1, 'a@x'); INSERT INTO orders VALUES (1, 1, 10)"
    )
    server = env.servers.redis
    if server is None:
        pytest.skip("the Redis is not one of the suite's processes (its ACL is not ours)")
    admin, url = _user(server, "narrow_listener")
    config = write_config(
        tmp_path / "acl.toml",
        database_url=env.dsn,
        redis_url=url,
        source_mark=False,
        tables={"public.users": ["user:{id}"], "public.orders": ["order:{id}"]},
    )
    assert main(["install", "--config", str(config)]) == 0
    admin.mset({"order:1": "stale", "user:1": "stale"})
    listener = ListenerProcess(config, tmp_path / "listener.log").start()
    try:
        env.sql("UPDATE orders SET total = 11 WHERE id = 1")
        wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
        (line,) = listener.logged("redis_unavailable")
        assert "NoPermissionError" in line["error"], line
        assert "refused UNLINK of 'order:1'" in line["error"], line
        assert admin.get("order:1") == "stale"  # nothing deleted, nothing acknowledged
        env.sql("UPDATE users SET email = 'b@x' WHERE id = 1")  # (waits behind it)
        admin.execute_command("ACL", "SETUSER", "narrow_listener", "~order:*")
        wait_until(lambda: admin.exists("order:1", "user:1") == 0, what="deleted once allowed")
        wait_until(lambda: listener.logged("redis_available"), what="redis_available")
        assert len(listener.logged("redis_unavailable")) == 1  # one line, not one per retry
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        listener.kill()
        admin.execute_command("ACL", "DELUSER", "narrow_listener")
        admin.close()


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
