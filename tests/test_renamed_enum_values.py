"""An enum value renamed (ALTER TYPE ... RENAME VALUE), in both capture modes: every row
holding it reads otherwise from then on, with no row change a trigger sees or decoding
sends, so the rows an app cached kept the old label for good, and keys rendered from it
(`user:st:active`) were never deleted. The rebuild guard sweeps the templates of each
watched table with a column of the type, or of a domain, array, range, multirange or
composite type over it (a table's row type too), in the command's transaction. ADD
VALUE changes no row, and sweeps nothing."""

from __future__ import annotations

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
    "public.accounts": ["acct:{id}"],  # another table's row type holding it
    "public.nested": ["nested:{id}"],  # a domain over an array of a composite holding it
    "public.parent": ["par:{id}"],  # an inheritance child's own column of it
    "public.items": ["item:{id}"],  # no enum: not swept
}
DDL = (
    "CREATE SCHEMA other;"
    "CREATE TYPE other.state AS ENUM ('active', 'closed');"
    "CREATE DOMAIN dstate AS other.state;"
    "CREATE TYPE state_range AS RANGE (subtype = other.state);"
    "CREATE TYPE window_ AS (name text, states state_range);"
    "CREATE TABLE addr (city text, st other.state);"
    "CREATE TYPE holder AS (s other.state);"
    "CREATE DOMAIN dholders AS holder[];"
    "CREATE TABLE users (id int PRIMARY KEY, email text, st other.state);"
    "CREATE TABLE orders (id int PRIMARY KEY, sts dstate[]);"
    "CREATE TABLE spans (id int PRIMARY KEY, w window_);"
    "CREATE TABLE periods (id int PRIMARY KEY, m state_multirange);"
    "CREATE TABLE accounts (id int PRIMARY KEY, a addr);"
    "CREATE TABLE nested (id int PRIMARY KEY, v dholders);"
    "CREATE TABLE parent (id int PRIMARY KEY);"
    "CREATE TABLE child (st other.state) INHERITS (parent);"
    "CREATE TABLE items (id int PRIMARY KEY, sku text);"
    "INSERT INTO users VALUES (1, 'a@x', 'active'), (2, 'b@x', 'closed');"
    "INSERT INTO orders VALUES (1, ARRAY['active']::dstate[]);"
    "INSERT INTO spans VALUES (1, ROW('w', '[active,closed]'));"
    "INSERT INTO periods VALUES (1, '{[active,closed]}');"
    "INSERT INTO accounts VALUES (1, ROW('x', 'active'));"
    "INSERT INTO nested VALUES (1, ARRAY[ROW('active')::holder]::dholders);"
    "INSERT INTO child VALUES (1, 'active');"
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
    "acct:1": "(x,active)",
    "nested:1": "{(active)}",
    "par:1": "1",
    "item:1": "s1",
}


def left_after(env: Env, ddl: str) -> set[str]:
    """DDL installed, CACHED cached, `ddl` run with the listener: the keys left once
    everything committed before a sync point after it is done."""
    env.sql(DDL)
    path = env.config({**TABLES, **SYNC})
    assert main(["install", "--config", str(path)]) == 0
    r = env.redis()
    with listening(path):
        settle(env, r)
        r.mset(CACHED)
        env.sql(ddl)
        settle(env, r)
        return {k for k in keys(r) if not k.startswith("sync:")}


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TYPE other.state RENAME VALUE 'active' TO 'open'",
        "DO $$ BEGIN ALTER TYPE other.state RENAME VALUE 'active' TO 'open'; END $$",
        "BEGIN; ALTER TYPE other.state ADD VALUE 'x';"
        " ALTER TYPE other.state RENAME VALUE 'active' TO 'open';"
        " ALTER TYPE other.state RENAME VALUE 'closed' TO 'shut'; COMMIT",
    ],
    ids=["plain", "do-block", "add-and-two-renames"],
)
def test_renaming_an_enum_value_sweeps_the_tables_that_hold_it(env: Env, ddl: str) -> None:
    assert left_after(env, ddl) == {"item:1"}
    assert env.scalar("SELECT st::text FROM users WHERE id = 1") == "open"
    assert env.scalar("SELECT a::text FROM accounts") == "(x,open)"


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TYPE other.state ADD VALUE 'archived'",
        "ALTER TYPE other.state RENAME TO state2",  # its name: no value reads otherwise
        "CREATE TYPE other AS ENUM ('x'); ALTER TYPE other RENAME VALUE 'x' TO 'y';"
        " CREATE TABLE unwatched (o other)",
        # undone: the rows read as before
        "BEGIN; ALTER TYPE other.state RENAME VALUE 'active' TO 'open'; ROLLBACK",
    ],
    ids=["add-value", "rename-type", "another-enum", "rolled-back"],
)
def test_what_changes_no_rows_text_sweeps_nothing(env: Env, ddl: str) -> None:
    assert left_after(env, ddl) == set(CACHED)
