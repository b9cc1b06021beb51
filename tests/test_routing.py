"""Per-table key_prefix and redis_db: where a table's keys live. Both capture modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import Spawn, check, listening, stop_listener
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


def test_check_errors_for_a_template_the_redis_user_may_not_delete(
    env: Env, capsys: pytest.CaptureFixture[str], spawn: Spawn
) -> None:
    """An ACL whose key patterns leave a table's keys out (~user:*): the listener waits
    at that table's first change, and every change after it. `check` said ok; the
    listener's warning named no key nor template, and now sends the reader to check."""
    config = configure(env)
    r = env.redis()
    r.execute_command(
        "ACL", "SETUSER", "narrow", "on", ">narrow-pw", "resetkeys", "~user:*",
        "resetchannels", "-@all", "+unlink", "+scan", "+info", "+ping", "+client|setname",
        "+config|get", "+select",
    )  # fmt: skip
    try:
        narrow = env.redis_url.replace("redis://", "redis://narrow:narrow-pw@", 1)
        text = config.read_text().replace(repr(env.redis_url)[1:-1], narrow)
        assert narrow in text
        config.write_text(text)
        code, _out, err = check(config, capsys)
        assert code == 1
        [line] = [line for line in err.splitlines() if "may not delete" in line]
        assert "public.orders" in line
        assert "'order:{id}'" in line
        assert "users" not in line
        listener = spawn(config)
        env.sql("UPDATE orders SET note = 'n' WHERE id = 1")
        wait_until(lambda: listener.logged("redis_unavailable"), what="the NOPERM")
        [refused] = listener.logged("redis_unavailable")
        assert "NoPermissionError" in refused["error"]
        assert "`cdc-invalidator check` names the template" in refused["detail"]
        stop_listener(listener)
    finally:
        r.execute_command("ACL", "DELUSER", "narrow")
