"""Per-table key_prefix and redis_db: where a table's keys live. Both capture modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import listening
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

OTHER_DB = 3


def configure(env: Env) -> Path:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "CREATE TABLE orders (id int PRIMARY KEY, note text);"
        "INSERT INTO users VALUES (1, 'a@x'); INSERT INTO orders VALUES (1, 'one'), (2, 'two')"
    )
    config = env.config({"public.users": ["user:{id}"]})
    # orders: its own database and a namespace prefix.
    with config.open("a") as f:
        f.write(
            '[tables."public.orders"]\n'
            'keys = ["order:{id}"]\n'
            'key_prefix = "shop:"\n'
            f"redis_db = {OTHER_DB}\n"
        )
    assert main(["install", "--config", str(config)]) == 0
    return config


def db(env: Env, n: int) -> redis.Redis:
    return redis.Redis.from_url(env.redis_url.rsplit("/", 1)[0] + f"/{n}", decode_responses=True)


def test_a_table_keys_go_to_its_own_database_with_its_prefix(env: Env) -> None:
    config = configure(env)
    main_db, other = env.redis(), db(env, OTHER_DB)
    other.flushdb()
    try:
        with listening(config):
            main_db.set("user:1", "u")
            # The same key name in both databases: only the configured one is deleted.
            main_db.set("shop:order:1", "not ours")
            other.mset({"shop:order:1": "o", "order:1": "unprefixed"})
            env.sql("UPDATE orders SET note = 'uno' WHERE id = 1; UPDATE users SET email = 'b@x'")
            wait_until(lambda: other.exists("shop:order:1") == 0, what="the order key in db 3")
            wait_until(lambda: main_db.exists("user:1") == 0, what="the user key in db 0")
            assert main_db.get("shop:order:1") == "not ours"
            assert other.get("order:1") == "unprefixed"

            # TRUNCATE sweeps the prefixed pattern in that database only.
            other.mset({"shop:order:2": "o", "shop:other:2": "x"})
            main_db.set("shop:order:2", "not ours")
            env.sql("TRUNCATE orders")
            wait_until(lambda: other.exists("shop:order:2") == 0, what="the sweep in db 3")
            assert other.get("shop:other:2") == "x"
            assert main_db.get("shop:order:2") == "not ours"
    finally:
        other.flushdb()
        other.close()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("redis_db = -1", "redis_db"),
        ('key_prefix = "x{id}:"', "no braces"),
    ],
)
def test_bad_table_routing_is_a_config_error(
    env: Env, capsys: pytest.CaptureFixture[str], line: str, error: str
) -> None:
    config = env.config({"public.users": ["user:{id}"]})
    with config.open("a") as f:
        f.write(line + "\n")
    assert main(["check", "--config", str(config)]) == 2
    assert error in capsys.readouterr().err
