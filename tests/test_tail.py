"""`cdc-invalidator tail`: invalidations printed as they happen, from a real listener
(a `run` process) through a real Redis, in both capture modes. The tail observes only:
the listener consumes on, and publishes nothing while nobody tails."""

from __future__ import annotations

import signal

import pytest

from cdc_invalidator.capture.logical import GATHER_AFTER
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.faults import Written, acknowledged, setup_users, write
from tests.support.listener import ListenerProcess, Spawn, run_cli, stop_listener
from tests.support.servers import RedisServer
from tests.support.tail import LINE, StartedTails, Tail, channel_of, subscribers
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

RIGHT = "right-one"  # a test server's password


def test_tail_prints_each_invalidation_while_the_listener_consumes(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    config = setup_users(env, rows=200)
    listener = spawn(config)
    r = env.redis()
    tail = started_tail(env, config, "--table", "users")
    assert "Ctrl-C to stop" in tail.stderr()

    # The listener asks whether anyone tails once a second at most: write (each write
    # its own row, once the last one is consumed) until a change is shown.
    seen: list[Written] = []
    shown: dict[str, str] = {}

    def a_change_shown() -> bool:
        for text in tail.lines():
            match = LINE.match(text)
            if match:
                shown.update(match.groupdict())
                return True
        if not seen or acknowledged(env, seen[-1]):
            i = len(seen) + 1
            r.set(f"user:{i}", "stale")
            update = "UPDATE users SET email = 'x' || id WHERE id = %s"
            seen.append(write(env, update, [i], ids=range(i, i + 1)))
        return False

    wait_until(a_change_shown, what="a change shown by tail", timeout_s=30)
    i = int(shown["keys"].split()[0].removeprefix("user:"))
    assert shown["table"] == "public.users"
    assert shown["op"] == "UPDATE"
    # The row's keys, old and new email included.
    assert shown["keys"].split() == [f"user:{i}", f"user:email:u{i}@x", f"user:email:x{i}"]
    assert 0 <= int(shown["ms"]) < 60_000, shown
    if env.logical:
        assert "commit LSN" in shown["txn"]
    # It observed: the listener consumed every change, and deleted its keys.
    wait_until(lambda: acknowledged(env, seen[-1]), what="the changes acknowledged")
    assert r.exists(*[f"user:{n}" for n in range(1, len(seen) + 1)]) == 0
    assert tail.interrupt() == 0, tail.stderr()
    assert "Traceback" not in tail.stderr()
    wait_until(lambda: subscribers(r, channel_of(env)) == 0, what="tail unsubscribed")
    stop_listener(listener)


def test_tail_shows_a_truncate_as_a_sweep(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    config = setup_users(env, rows=3)
    listener = spawn(config)
    tail = started_tail(env, config)

    def truncate_shown() -> bool:
        env.sql("TRUNCATE users")
        return any(" public.users TRUNCATE sweep user:* user:email:*" in t for t in tail.lines())

    wait_until(truncate_shown, what="a TRUNCATE shown", timeout_s=30)
    assert tail.interrupt() == 0
    stop_listener(listener)


def written_until_shown(env: Env, tail: Tail, statement: str, text: str) -> list[str]:
    """`statement` run until tail printed a line with `text` (the listener asks whether
    anyone tails once a second at most): those lines."""
    shown: list[str] = []

    def a_line_shown() -> bool:
        env.sql(statement)
        shown.extend(t for t in tail.lines() if text in t)
        return bool(shown)

    wait_until(a_line_shown, what=f"a line with {text!r}", timeout_s=30)
    return shown


def test_tail_shows_a_dropped_key_columns_sweep_as_unrenderable(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    """A change whose key column was dropped is swept: tail says so, and why, instead
    of showing a TRUNCATE nobody ran."""
    config = setup_users(env, rows=3)
    listener = spawn(config)
    tail = started_tail(env, config)
    env.sql("ALTER TABLE users DROP COLUMN email")

    shown = written_until_shown(
        env, tail, "UPDATE users SET id = id WHERE id = 1", " public.users UNRENDERABLE sweep "
    )
    assert "user:* user:email:* (" in shown[0], shown
    assert "email" in shown[0].split("user:email:* (", 1)[1], "the reason names the column"
    assert tail.interrupt() == 0
    assert not any("TRUNCATE" in t for t in tail.lines())
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["logical"], ids=["logical"])
def test_tail_shows_the_sweep_after_missed_changes_as_resync(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    """The sweep owed after changes may have been missed (logical mode: a lost slot)
    shows as what it is, with the reason, not as TRUNCATEs of every table."""
    config = setup_users(env, rows=3)
    stop_listener(spawn(config))  # (the slot and its state row exist)
    env.sql("UPDATE cdc_invalidator.slot_state_v1 SET resync_reason = 'owed: a test said so'")
    r = env.redis()
    tail = started_tail(env, config)
    wait_until(lambda: subscribers(r, channel_of(env)) == 1, what="tail subscribed")
    listener = spawn(config)  # its first batch is the sweep, which it asks about

    wait_until(lambda: " RESYNC sweep " in "\n".join(tail.lines()), what="the sweep shown")
    (shown,) = [t for t in tail.lines() if " RESYNC sweep " in t]
    assert " public.users RESYNC sweep user:* user:email:* (owed: a test said so: " in shown
    assert tail.interrupt() == 0
    assert not any("TRUNCATE" in t for t in tail.lines())
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["trigger"], ids=["trigger"])
def test_tail_shows_a_bulk_statements_sweep_as_bulk(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    """Trigger mode's bulk_sweep_rows: a statement of that many rows is one sweep,
    shown as the bulk statement it stands for, with the setting that made it one."""
    config = setup_users(env, rows=1000, bulk_sweep_rows=1000)
    listener = spawn(config)
    tail = started_tail(env, config)

    shown = written_until_shown(
        env, tail, "UPDATE users SET email = email", " public.users BULK sweep "
    )
    assert "user:* user:email:* (a statement of 1000 rows or more: bulk_sweep_rows)" in shown[0]
    assert tail.interrupt() == 0
    assert not any("TRUNCATE" in t for t in tail.lines())
    stop_listener(listener)


def test_nobody_tailing_nothing_is_published(env: Env, spawn: Spawn) -> None:
    r = env.redis()
    r.config_resetstat()
    config = setup_users(env, rows=100)
    listener: ListenerProcess = spawn(config)
    for i in range(1, 21):
        done = write(
            env, "UPDATE users SET email = 'y' || id WHERE id = %s", [i], ids=range(i, i + 1)
        )
    wait_until(lambda: acknowledged(env, done), what="the changes acknowledged")
    stats = r.info("commandstats")
    assert "cmdstat_unlink" in stats, "the listener deleted through this Redis"
    assert "cmdstat_publish" not in stats, stats
    # It asked whether anyone tails, at most once a second while batches flowed.
    assert "cmdstat_pubsub|numsub" in stats
    stop_listener(listener)


def test_tail_ends_cleanly_on_sigint_or_sigterm_whatever_its_parent_ignored(env: Env) -> None:
    """Ctrl-C (or `kill -INT`) ends tail: so it did only while SIGINT reached Python's own
    handler, and a tail started with SIGINT ignored (a shell's background job: a whole
    test run started with `&` failed every test that stops one) ran on. SIGTERM, the
    usual stop of a background process, ends it as cleanly (it killed it: exit 143)."""
    config = env.config({"public.users": ["user:{id}"]})
    r = env.redis()
    for signum, ignoring_sigint in [(signal.SIGINT, True), (signal.SIGTERM, False)]:
        where = env.tmp_path / signum.name
        where.mkdir()
        tail = Tail(config, where, ignoring_sigint=ignoring_sigint)
        try:
            wait_until(lambda: subscribers(r, channel_of(env)) == 1, what="tail subscribed")
            tail.process.send_signal(signum)
            assert tail.process.wait(20) == 0, tail.stderr()
        finally:
            tail.kill()
        assert "Traceback" not in tail.stderr()
        # (Gone from the channel before the next one counts as subscribed.)
        wait_until(lambda: subscribers(r, channel_of(env)) == 0, what="tail unsubscribed")


def test_tail_table_shows_that_table_only(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int)"
    )
    config = env.config({"public.users": ["user:{id}"], "public.orders": ["order:{id}"]})
    assert run_cli("install", "--config", str(config)).returncode == 0
    listener = spawn(config)
    tail = started_tail(env, config, "--table", "public.orders")
    written: list[Written] = []

    def an_order_shown() -> bool:
        if any(" public.orders INSERT order:" in t for t in tail.lines()):
            return True
        if not written or acknowledged(env, written[-1]):
            # Both tables in one transaction: one batch, one message.
            i = len(written) + 1
            both = (
                "WITH u AS (INSERT INTO users VALUES (%s, 'e')) INSERT INTO orders VALUES (%s, %s)"
            )
            written.append(write(env, both, [i, i, i], ids=range(i, i + 1)))
        return False

    wait_until(an_order_shown, what="an order shown", timeout_s=30)
    assert not any("public.users" in t for t in tail.lines()), tail.lines()
    assert tail.interrupt() == 0
    stop_listener(listener)


# Rows per statement: past the changes of a transaction that logical mode decodes one by
# one before gathering the rest column-wise (capture/logical.py).
STATEMENT_ROWS = GATHER_AFTER + 36


def test_tail_shows_each_row_of_a_multi_row_statement(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    """A statement of many rows is a pack in trigger mode, and mostly gathered
    column-wise in logical mode: the listener renders its keys without an event per row.
    The tail still shows each row, a line each, with that row's keys."""
    config = setup_users(env, rows=30 * STATEMENT_ROWS)
    listener = spawn(config)
    tail = started_tail(env, config, "--table", "users")
    seen: list[Written] = []
    lines: dict[int, list[str]] = {}  # a row's id -> its line's keys
    n = STATEMENT_ROWS

    def starts() -> range:  # the first row of each statement written
        return range(1, n * len(seen), n)

    def a_whole_statement_shown() -> bool:
        for text in tail.lines():
            match = LINE.match(text)
            if match and match["op"] == "UPDATE":
                keys = match["keys"].split()
                lines[int(keys[0].removeprefix("user:"))] = keys
        if any(all(i + k in lines for k in range(n)) for i in starts()):
            return True
        if not seen or acknowledged(env, seen[-1]):
            i = n * len(seen) + 1  # rows i to i + n - 1 in one statement
            update = "UPDATE users SET email = 'p' || id WHERE id BETWEEN %s AND %s"
            seen.append(write(env, update, [i, i + n - 1], ids=range(i, i + n)))
        return False

    # The listener asks whether anyone tails once a second at most: the first
    # statements may go by unseen.
    wait_until(a_whole_statement_shown, what="each row of a statement shown", timeout_s=30)
    first = next(i for i in starts() if all(i + k in lines for k in range(n)))
    for k in range(first, first + n):
        assert lines[k] == [f"user:{k}", f"user:email:p{k}", f"user:email:u{k}@x"]
    assert tail.interrupt() == 0, tail.stderr()
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["trigger"])  # (Redis alone)
def test_a_password_redis_refuses_ends_tail_with_the_error(env: Env) -> None:
    """The listener waits for a password being fixed; a command run by hand says so at
    once, instead of subscribing again every second for good."""
    locked = RedisServer.create()
    with locked:
        locked.client().config_set("requirepass", RIGHT)
        config = write_config(
            env.tmp_path / "wrong.toml",
            database_url=env.dsn,
            redis_url=f"redis://:wrong-one@127.0.0.1:{locked.port}/0",
            tables={"public.users": ["user:{id}"]},
        )
        done = run_cli("tail", "--config", str(config))
        locked.client(password=RIGHT).config_set("requirepass", "")  # (to stop it)
    assert done.returncode == 1
    assert "Redis: AuthenticationError" in done.stderr
    assert "wrong-one" not in done.stdout + done.stderr
