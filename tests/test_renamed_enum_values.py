"""An enum value renamed (ALTER TYPE ... RENAME VALUE), in both capture modes: every row
holding it reads otherwise from then on, with no row change a trigger sees or decoding
sends, so the rows an app cached kept the old label for good, and keys rendered from it
(`user:st:active`) were never deleted. The rebuild guard sweeps the templates of each
watched table with a column of the type, or of a domain, array, range or composite type
over it, in the command's transaction. ADD VALUE changes no row, and sweeps nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import listening
from tests.support.sync import SYNC, keys, settle

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

TABLES = {
    "public.users": ["user:{id}", "user:st:{st}"],  # the enum itself, a key column
    "public.orders": ["order:{id}"],  # an array of a domain over it, not a key column
    "public.spans": ["span:{id}"],  # a composite type holding a range over it
    "public.periods": ["period:{id}"],  # a multirange of it
    "public.items": ["item:{id}"],  # no enum: not swept
}
DDL = (
    "CREATE TYPE state AS ENUM ('active', 'closed');"
    "CREATE DOMAIN dstate AS state;"
    "CREATE TYPE state_range AS RANGE (subtype = state);"
    "CREATE TYPE window_ AS (name text, states state_range);"
    "CREATE TABLE users (id int PRIMARY KEY, email text, st state);"
    "CREATE TABLE orders (id int PRIMARY KEY, sts dstate[]);"
    "CREATE TABLE spans (id int PRIMARY KEY, w window_);"
    "CREATE TABLE periods (id int PRIMARY KEY, m state_multirange);"
    "CREATE TABLE items (id int PRIMARY KEY, sku text);"
    "INSERT INTO users VALUES (1, 'a@x', 'active'), (2, 'b@x', 'closed');"
    "INSERT INTO orders VALUES (1, ARRAY['active']::dstate[]);"
    "INSERT INTO spans VALUES (1, ROW('w', '[active,closed]'));"
    "INSERT INTO periods VALUES (1, '{[active,closed]}');"
    "INSERT INTO items VALUES (1, 's1');"
    "CREATE TABLE sync (id int PRIMARY KEY)"
)
CACHED = {
    "user:1": "active",
    "user:st:active": "1",
    "user:2": "closed",
    "order:1": "{active}",
    "span:1": "(w,[active,closed])",
    "period:1": "{[active,closed]}",
    "item:1": "s1",
}


def installed(env: Env) -> Path:
    env.sql(DDL)
    path = env.config({**TABLES, **SYNC})
    assert main(["install", "--config", str(path)]) == 0
    return path


def left(env: Env) -> set[str]:
    return {k for k in keys(env.redis()) if not k.startswith("sync:")}


def test_renaming_an_enum_value_sweeps_the_tables_that_hold_it(env: Env) -> None:
    path = installed(env)
    r = env.redis()
    with listening(path):
        settle(env, r)
        r.mset(CACHED)
        env.sql("ALTER TYPE state RENAME VALUE 'active' TO 'open'")
        settle(env, r)
        assert env.scalar("SELECT st::text FROM users WHERE id = 1") == "open"
        assert left(env) == {"item:1"}


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TYPE state ADD VALUE 'archived'",
        "ALTER TYPE state RENAME TO state2",  # its name: no value reads otherwise
        "CREATE TYPE other AS ENUM ('x'); ALTER TYPE other RENAME VALUE 'x' TO 'y';"
        " CREATE TABLE unwatched (o other)",
        # undone: the rows read as before
        "BEGIN; ALTER TYPE state RENAME VALUE 'active' TO 'open'; ROLLBACK",
    ],
    ids=["add-value", "rename-type", "another-enum", "rolled-back"],
)
def test_what_changes_no_rows_text_sweeps_nothing(env: Env, ddl: str) -> None:
    path = installed(env)
    r = env.redis()
    with listening(path):
        settle(env, r)
        r.mset(CACHED)
        env.sql(ddl)
        settle(env, r)
        assert left(env) == set(CACHED)
