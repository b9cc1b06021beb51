"""The shortest path through the whole pipeline: install, run, update, key gone."""

from __future__ import annotations

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import ListenerThread
from tests.support.waits import wait_until


def test_update_deletes_old_and_new_keys(env: Env) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        "INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B')"
    )
    config = env.config({"public.users": ["user:{id}", "user:email:{email}"]})
    assert main(["install", "--config", str(config)]) == 0
    r = env.redis()
    r.mset({"user:1": "A", "user:email:a@x": "1", "user:email:c@x": "-", "user:2": "B"})
    listener = ListenerThread.from_file(config).start()
    try:
        env.sql("UPDATE users SET email = 'c@x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1", "user:email:a@x", "user:email:c@x") == 0)
        assert r.get("user:2") == "B"
    finally:
        listener.stop()
