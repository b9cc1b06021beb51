"""A watched table that a logical-replication subscription writes into: this database
is the subscriber. PostgreSQL's apply worker fires row triggers only, never statement
triggers, so trigger mode's capture misses every change it applies (the first test
shows it, with a statement trigger of its own). Trigger mode's install refuses such a
table while the subscription is enabled and warns of a disabled one; `check` names
both. Logical mode captures the applied rows, which are in the subscriber's WAL like any
other write, as the refusal's hint says.

The publisher is another database of the test's server. Its slot is made apart: a
subscription cannot make one on its own server in the same command (it would wait on
itself)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env, drop_database
from tests.support.listener import Spawn, run_cli, stop_listener
from tests.support.logical import logical_config, running
from tests.support.sync import SYNC
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}
TABLE = "CREATE TABLE users (id int PRIMARY KEY, email text)"
# The tables of the partition cases, on both sides.
EVENTS = (
    "CREATE TABLE ev (id int PRIMARY KEY) PARTITION BY RANGE (id);"
    "CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM (0) TO (100)"
)
OURS = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cdc\\_invalidator\\_%%'"
REFUSED = "apply worker fires no statement trigger"


@dataclass
class Publisher:
    """The publishing database, and the subscription in the test's database."""

    dsn: str
    subscription: str

    def sql(self, query: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query.encode())


@pytest.fixture
def publisher(env: Env) -> Iterator[Publisher]:
    """A database publishing `users` (and `ev`, `ev_1`); the tables (and `sync`) in the
    test's database; a subscription there is made by subscribe()."""
    name = "p_" + uuid.uuid4().hex[:12]
    admin = env.servers.pg_dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    pub = Publisher(env.servers.pg_dsn(name), "s_" + name)
    try:
        pub.sql(f"{TABLE}; {EVENTS}; CREATE PUBLICATION pub FOR TABLE users, ev, ev_1")
        env.sql(f"{TABLE}; {EVENTS}; CREATE TABLE sync (id int PRIMARY KEY)")
        yield pub
    finally:
        made = "SELECT count(*) FROM pg_subscription WHERE subname = %s"
        if env.scalar(made, [pub.subscription]):
            env.sql(f"ALTER SUBSCRIPTION {pub.subscription} DISABLE")
            env.sql(f"ALTER SUBSCRIPTION {pub.subscription} SET (slot_name = NONE)")
            env.sql(f"DROP SUBSCRIPTION {pub.subscription}")
        drop_database(admin, name)  # and its slot (its walsender ended first)


def subscribe(env: Env, pub: Publisher, publication: str = "pub", enabled: bool = True) -> None:
    """The subscription, of `publication` (its apply worker starts on its own)."""
    pub.sql(f"SELECT pg_create_logical_replication_slot('{pub.subscription}', 'pgoutput')")
    if publication != "pub":
        # (via the root: the subscription names ev, and routes each row to its partition)
        pub.sql(f"CREATE PUBLICATION {publication} FOR TABLE ev WITH (publish_via_partition_root)")
    env.sql(
        f"CREATE SUBSCRIPTION {pub.subscription} CONNECTION '{pub.dsn}' PUBLICATION {publication}"
        f" WITH (create_slot = false, slot_name = '{pub.subscription}', copy_data = false,"
        f" enabled = {str(enabled).lower()})"
    )


def applied(env: Env, pub: Publisher, write: str, then: str) -> None:
    """`write` on the publisher, applied here: `then` (a query) is true."""
    pub.sql(write)
    wait_until(lambda: env.scalar(then), what=f"{write!r} applied by the subscription")


def test_the_apply_worker_fires_no_statement_trigger(env: Env, publisher: Publisher) -> None:
    """Why the refusal: the premise, measured on this server. A statement trigger of
    ours would not fire for the rows the subscription applies; a row trigger does."""
    env.sql(
        "CREATE TABLE fired (level text);"
        "CREATE FUNCTION fired() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN INSERT INTO public.fired VALUES (TG_LEVEL); RETURN NULL; END $$;"
        "CREATE TRIGGER s AFTER INSERT OR UPDATE OR DELETE ON users"
        " FOR EACH STATEMENT EXECUTE FUNCTION fired();"
        "CREATE TRIGGER r AFTER INSERT OR UPDATE OR DELETE ON users"
        " FOR EACH ROW EXECUTE FUNCTION fired();"
        "ALTER TABLE users ENABLE ALWAYS TRIGGER s; ALTER TABLE users ENABLE ALWAYS TRIGGER r"
    )
    subscribe(env, publisher)
    applied(env, publisher, "INSERT INTO users VALUES (1, 'a@x')",
            "SELECT count(*) FROM users WHERE id = 1")  # fmt: skip
    applied(env, publisher, "UPDATE users SET email = 'b@x'",
            "SELECT count(*) FROM users WHERE email = 'b@x'")  # fmt: skip
    fired = env.scalar("SELECT array_agg(level ORDER BY level) FROM fired")
    assert fired == ["ROW", "ROW"], fired


@pytest.mark.parametrize(
    ("write", "tables", "into"),
    [
        ("users", USERS, "public.users"),
        # A partition of the configured table, and the partitioned table of a configured
        # partition (the apply worker routes a row into the partition it belongs to).
        ("ev_1", {"public.ev": ["ev:{id}"]}, "public.ev_1"),
        ("ev", {"public.ev_1": ["ev:{id}"]}, "public.ev"),
    ],
    ids=["table", "its-partition", "its-partitioned-table"],
)
def test_trigger_mode_refuses_a_table_an_enabled_subscription_writes(
    env: Env, publisher: Publisher, write: str, tables: dict[str, list[str]], into: str
) -> None:
    """Installed, the subscription's changes went by uncaptured and their keys stayed
    cached for good, unsaid (docs only). Now install refuses, changing nothing, with the
    way out; `check` names the table and the subscription."""
    subscribe(env, publisher, "pub" if write != "ev" else "only_ev")
    (table,) = tables
    config = env.config({**tables, **SYNC})
    refused = run_cli("install", "--config", str(config))
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said
    named = f"table {table} is written by logical-replication subscription {publisher.subscription}"
    assert named in said, said
    assert (f"(which applies rows into {into})" in said) == (into != table), said
    assert REFUSED in said, said
    assert "nothing was changed" in said, said
    assert 'hint: use logical mode on this database (capture = "logical")' in said, said
    assert "Or drop the subscription" in said, said
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
    assert int(env.scalar(OURS)) == 0


def test_a_disabled_subscription_is_warned_of_and_checked_once_enabled(
    env: Env, publisher: Publisher, spawn: Spawn
) -> None:
    """A disabled subscription applies nothing (a migration's leftover, kept to go
    back): install goes through with a warning, and `check` warns. Enabled after
    install (as a subscription made after install would be), `check` fails, naming it,
    and the listener logs it as an error at its start."""
    subscribe(env, publisher, enabled=False)
    config = env.config({**USERS, **SYNC})
    done = run_cli("install", "--config", str(config))
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    named = (
        f"table public.users is written by logical-replication subscription "
        f"{publisher.subscription}, which is disabled"
    )
    assert f"warning: cdc_invalidator: {named}" in said, said
    checked = run_cli("check", "--config", str(config))
    out = checked.stdout + checked.stderr
    assert checked.returncode == 0, out
    quoted = named.replace(publisher.subscription, f"'{publisher.subscription}'")
    assert f"warning: {quoted}" in out, out

    env.sql(f"ALTER SUBSCRIPTION {publisher.subscription} ENABLE")
    enabled = quoted.replace(", which is disabled", f", and PostgreSQL's {REFUSED}")
    # the listener says so at its start, an error now (a warning while disabled)
    listener = spawn(config)
    wait_until(lambda: listener.logged("table_written_by_subscription"), what="the error")
    [line] = listener.logged("table_written_by_subscription")
    assert line["level"] == "error", line
    assert line["subscription"] == publisher.subscription, line
    assert line["table"] == "public.users", line
    assert line["detail"].startswith(enabled), line
    stop_listener(listener)
    checked = run_cli("check", "--config", str(config))
    out = checked.stdout + checked.stderr
    assert checked.returncode != 0, out
    assert f"error: {enabled}" in out, out


def test_logical_mode_captures_what_a_subscription_applies(env: Env, publisher: Publisher) -> None:
    """The way out the refusal names: the applied rows are in this database's WAL, and
    logical mode's listener deletes their keys (an UPDATE's old and new email, a
    DELETE's)."""
    subscribe(env, publisher)
    applied(env, publisher, "INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x')",
            "SELECT count(*) = 2 FROM users")  # fmt: skip
    config = logical_config(env, {**USERS, **SYNC})
    assert main(["install", "--config", str(config)]) == 0
    r = env.redis()
    with running(env, config):
        r.mset({"user:1": "x", "user:email:a@x": "x", "user:2": "x", "user:email:b@x": "x",
                "other:1": "keep"})  # fmt: skip
        publisher.sql("UPDATE users SET email = 'c@x' WHERE id = 1")
        publisher.sql("DELETE FROM users WHERE id = 2")
        wait_until(
            lambda: r.exists("user:1", "user:email:a@x", "user:2", "user:email:b@x") == 0,
            what="the applied UPDATE's and DELETE's keys deleted",
        )
    assert r.get("other:1") == "keep"
