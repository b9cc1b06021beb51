"""Trigger mode's bulk statements against real servers: a statement of many rows is
queued in packs (one queue row per pack_rows_v1() rows, the key columns as arrays; a
statement of up to one_pack_rows_v1() rows as one), read back a batch_size of events at
a time, and every one of its keys is deleted.

The statements here span several packs and several read chunks (batch_size is lowered
to 1,500 events, a pack holds 1,000 rows): every boundary between them is crossed."""

from __future__ import annotations

import json
import re
import threading

import psycopg
import pytest
import redis

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.faults import Written, acknowledged, setup_users, write
from tests.support.listener import Spawn, listening, run_cli, stop_listener
from tests.support.sync import SYNC, install, keys, queue_len, settle
from tests.support.tail import LINE, StartedTails
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}
ROWS = 24_000  # 24 packs; 16 reads of 1,500 events
BATCH = 1_500
PACK = 1_000  # sql/schema.sql, pack_rows_v1()
ONE_PACK = 10_000  # sql/schema.sql, one_pack_rows_v1()

# Whether the saved position has passed queue row q (sql/explain_trigger.sql's test).
PROCESSED = """
    (pg_visible_in_snapshot(q.xid, s.snapshot)
     OR coalesce(pg_visible_in_snapshot(q.xid, s.window_end)
                 AND (q.xid, q.id) <= (s.after_xid, s.after_id), false))"""
FROM_QUEUE = "FROM cdc_invalidator.queue_v1 q CROSS JOIN cdc_invalidator.listener_state_v1 s"
# The keys (user:{id} only) of every queue row the saved position has passed, rendered
# from the row's own arrays (a single change's id, or each element of a pack's).
PROCESSED_KEYS = f"""
    SELECT 'user:' || coalesce(v.id, q.old_row->>'id')
    {FROM_QUEUE}
    LEFT JOIN LATERAL (
        SELECT json_array_elements_text(q.old_row->'id') AS id WHERE q.rows IS NOT NULL
    ) v ON true
    WHERE q.op = 'U' AND q.table_name = 'users' AND {PROCESSED}
"""


def users_table(env: Env, rows: int = ROWS) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    env.sql(
        "INSERT INTO users SELECT g, 'u' || g || '@x', 'n' FROM generate_series(1, %s) g",
        [rows],
    )


def cache_users(r: redis.Redis, ids: range, email: str = "u{}@x") -> None:
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.set(f"user:{i}", "row")
        pipe.set(f"user:email:{email.format(i)}", str(i))
    pipe.execute()


def packs(env: Env) -> list[tuple[str, int | None]]:
    with env.connect() as conn:
        return [
            (str(op), rows)
            for op, rows in conn.execute(
                "SELECT op, rows FROM cdc_invalidator.queue_v1 ORDER BY id"
            ).fetchall()
        ]


def first_pack(env: Env) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The old and new key columns of the first queue row."""
    with env.connect() as conn:
        row = conn.execute(
            "SELECT old_row, new_row FROM cdc_invalidator.queue_v1 ORDER BY id LIMIT 1"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_bulk_update_insert_and_delete_are_packed_and_every_key_deleted(env: Env) -> None:
    users_table(env)
    # It counts what is left in Redis right after each statement: no second deletes
    # (they would only delete the same keys again).
    config = install(env, USERS, batch_size=BATCH, second_delete_ms=0)
    r = env.redis()
    cache_users(r, range(1, ROWS + 1))
    cache_users(r, range(1, ROWS + 1), email="new{}@x")
    r.set("user:0", "not touched")

    env.sql("UPDATE users SET email = 'new' || id || '@x'")
    queued = packs(env)
    assert len(queued) == ROWS // PACK  # one queue row per pack, not per row
    assert {op for op, _ in queued} == {"U"}
    assert queue_len(env) == ROWS
    # `status` counts the backlog in changes, a pack weighing its rows.
    shown = run_cli("status", "--json", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["backlog"] == ROWS
    old, new = first_pack(env)  # the key columns column-wise; old and new paired by index
    assert sorted(old) == ["email", "id"]
    assert len(old["id"]) == PACK
    assert [f"new{i}@x" for i in old["id"]] == new["email"]

    with listening(config):
        wait_until(lambda: keys(r) == {"user:0"}, what="the 24,000-row UPDATE invalidated")
        cache_users(r, range(ROWS + 1, 2 * ROWS + 1))
        env.sql(
            "INSERT INTO users SELECT g, 'u' || g || '@x', 'n' FROM generate_series(%s, %s) g",
            [ROWS + 1, 2 * ROWS],
        )
        wait_until(lambda: keys(r) == {"user:0"}, what="the 24,000-row INSERT invalidated")
        cache_users(r, range(1, ROWS + 1), email="new{}@x")
        env.sql("DELETE FROM users WHERE id <= %s", [ROWS])
        wait_until(lambda: keys(r) == {"user:0"}, what="the 24,000-row DELETE invalidated")
        settle(env, r)
    assert r.get("user:0") == "not touched"
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_a_single_row_statement_is_queued_as_one_change(env: Env) -> None:
    users_table(env, rows=3)
    install(env, USERS)
    env.sql("UPDATE users SET name = 'x' WHERE id = 1")
    env.sql("UPDATE users SET name = 'x' WHERE id >= 2")
    assert packs(env) == [("U", None), ("U", 2)]


def test_a_statement_of_up_to_ten_thousand_rows_is_one_pack_and_one_more_is_packs(
    env: Env,
) -> None:
    """Up to one_pack_rows_v1() rows, a statement is one pack, aggregated in one pass
    (the cheaper form for its writer); one row more and it is packed by pack_rows_v1(),
    as a statement of a million rows is. Either way every old and new key goes."""
    users_table(env, rows=ONE_PACK + 1)
    config = install(env, USERS, second_delete_ms=0)
    r = env.redis()
    cache_users(r, range(1, ONE_PACK + 2))
    cache_users(r, range(1, ONE_PACK + 1), email="new{}@x")
    cache_users(r, range(1, ONE_PACK + 2), email="again{}@x")
    r.set("user:0", "not touched")
    env.sql("UPDATE users SET email = 'new' || id || '@x' WHERE id <= %s", [ONE_PACK])
    env.sql("UPDATE users SET email = 'again' || id || '@x'")  # one row more
    env.sql("DELETE FROM users WHERE id <= %s", [ONE_PACK])
    env.sql(
        "INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(1, %s) g", [ONE_PACK]
    )
    queued = packs(env)
    several = ONE_PACK // PACK + 1  # the second UPDATE's packs, in no set order
    assert queued[0] == ("U", ONE_PACK)
    assert sorted(queued[1 : 1 + several]) == [("U", 1)] + [("U", PACK)] * (several - 1)
    assert queued[1 + several :] == [("D", ONE_PACK), ("I", ONE_PACK)]
    old, new = first_pack(env)
    assert len(old["id"]) == ONE_PACK
    assert [f"new{i}@x" for i in old["id"]] == new["email"]  # paired by index
    with listening(config):
        settle(env, r)
    assert keys(r) == {"user:0"}
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_a_statement_with_a_long_key_value_is_packed_by_a_thousand(env: Env) -> None:
    """One pack holds rows of at most 1,024 bytes of key-column text each
    (one_pack_bytes_v1()), so that it never holds more than 10 MB of it in the writer's
    memory: a statement of 2,500 rows of which one has a longer email is packed by 1,000
    rows, as before one pack existed; the same statement of short values is one pack.
    Every key goes either way."""
    users_table(env, rows=0)
    config = install(env, USERS, second_delete_ms=0)
    r = env.redis()
    long_email = "x" * 1_100 + "@x"
    cache_users(r, range(1, 5_001))
    r.set(f"user:email:{long_email}", "long")
    r.set("user:0", "not touched")
    env.sql(
        "INSERT INTO users SELECT g, CASE WHEN g = 1700 THEN %s ELSE 'u' || g || '@x' END"
        " FROM generate_series(1, 2500) g",
        [long_email],
    )
    env.sql("INSERT INTO users SELECT g, 'u' || g || '@x' FROM generate_series(2501, 5000) g")
    assert sorted(packs(env)) == [("I", 500), ("I", PACK), ("I", PACK), ("I", 2_500)]
    with listening(config):
        settle(env, r)
    assert keys(r) == {"user:0", "user:email:u1700@x"}  # its row had the long email
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_a_key_column_retyped_to_text_since_install_is_measured_too(env: Env) -> None:
    """The capture function is compiled at install: a key column of integers retyped to
    text since then holds what the statement writes, so every key column's values are
    measured, whatever its type was."""
    env.sql("CREATE TABLE codes (id int PRIMARY KEY, code int)")
    config = install(env, {"public.codes": ["code:{code}"]}, second_delete_ms=0)
    env.sql("ALTER TABLE codes ALTER COLUMN code TYPE text")
    long_code = "9" * 1_100
    env.sql(
        "INSERT INTO codes SELECT g, CASE WHEN g = 1700 THEN %s ELSE g::text END"
        " FROM generate_series(1, 2500) g",
        [long_code],
    )
    # (the retype's rewrite queued a sweep of the table's keys before them)
    queued = [rows for _, rows in packs(env) if rows is not None]
    assert sorted(queued) == [500, PACK, PACK]
    with listening(config):
        settle(env, env.redis())
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_a_table_of_many_long_key_columns_is_packed_by_a_thousand(env: Env) -> None:
    """The bound is on a row's key-column text, not on each value's: with a bound of
    1,024 bytes per value, 18 text key columns of 1,000 control characters each (six
    bytes apiece in JSON, \\u0001) made a 10,000-row DELETE's one pack more than
    PostgreSQL's 1 GB of JSON, and the DELETE failed ("Cannot enlarge string buffer"; a
    helper's reproduction). Packs of 1,000 queue it, as before one pack existed."""
    columns = [f"k{i}" for i in range(1, 19)]
    env.sql(
        f"CREATE TABLE w (id int PRIMARY KEY, {', '.join(f'{c} text' for c in columns)});"
        f"INSERT INTO w SELECT g, {', '.join('repeat(chr(1), 1000)' for _ in columns)}"
        f" FROM generate_series(1, {ONE_PACK}) g"
    )
    install(env, {"public.w": ["w:{id}", *(f"{c}:{{{c}}}" for c in columns)]})
    env.sql("DELETE FROM w")
    assert packs(env) == [("D", PACK)] * (ONE_PACK // PACK)


@pytest.mark.parametrize("rows", [ROWS, ONE_PACK // 2], ids=["packs", "one-pack"])
def test_a_bulk_statement_that_rolls_back_deletes_nothing(env: Env, rows: int) -> None:
    """Statements of `rows` rows (in packs of 1,000, or each one pack) rolled back."""
    users_table(env, rows=rows)
    config = install(env, USERS, batch_size=BATCH)
    r = env.redis()
    cache_users(r, range(1, rows + 1))
    with listening(config):
        with env.connect() as conn:
            conn.autocommit = False
            conn.execute("UPDATE users SET email = 'gone' || id")
            conn.execute("DELETE FROM users WHERE id > 100")
            # (queued in the writer's transaction: one pack each, or a pack per 1,000 rows)
            queued = conn.execute("SELECT count(*) FROM cdc_invalidator.queue_v1").fetchone()
            packed = -(-rows // PACK) + -(-(rows - 100) // PACK)
            assert queued == (2 if rows <= ONE_PACK else packed,)
            conn.rollback()
        settle(env, r)  # everything committed before it is done: the rollback too
        assert len(keys(r)) == 2 * rows
    assert queue_len(env) == 0


def test_a_bulk_statement_amid_single_row_writes_misses_nothing_and_acks_in_order(
    env: Env,
) -> None:
    """A 24,000-row UPDATE held open while other sessions commit single-row UPDATEs,
    then committed: every key goes. And whenever the saved position has passed a queue
    row (sql/explain_trigger.sql's `processed`), that row's keys are gone already: the
    position never passes an undeleted change."""
    users_table(env)
    config = install(env, USERS, batch_size=BATCH, second_delete_ms=0)
    r = env.redis()
    cache_users(r, range(1, ROWS + 1))
    violations: list[str] = []
    stop = threading.Event()

    def watch_acknowledgements() -> None:
        with env.connect() as conn:
            conn.autocommit = True
            while not stop.is_set():
                rows = conn.execute(PROCESSED_KEYS).fetchall()
                if rows:
                    present = r.exists(*[key for (key,) in rows])
                    if present:
                        violations.append(f"{present} key(s) of acknowledged rows still cached")
                stop.wait(0.02)  # a look every 20 ms: enough to see the drain's steps

    watcher = threading.Thread(target=watch_acknowledgements)
    with listening(config), psycopg.connect(env.dsn) as bulk:
        watcher.start()
        try:
            bulk.execute("UPDATE users SET name = 'bulk' WHERE id > 100")
            # Single-row writes in other sessions, committed while the bulk one is open.
            for i in range(1, 101):
                env.sql("UPDATE users SET email = 'single' || id || '@x' WHERE id = %s", [i])
            wait_until(
                lambda: not r.exists(*[f"user:{i}" for i in range(1, 101)]),
                what="the single-row writes invalidated before the bulk commit",
            )
            assert len(keys(r)) == 2 * ROWS - 200  # the bulk change not yet
            bulk.commit()
            wait_until(lambda: not keys(r), what="every key of the bulk UPDATE deleted")
            settle(env, r)
        finally:
            stop.set()
            watcher.join()
    assert not violations, violations[:5]


def test_a_bad_element_of_a_pack_is_dead_lettered_alone(env: Env) -> None:
    users_table(env, rows=0)
    config = install(env, USERS)
    r = env.redis()
    for i in (1, 2, 3, 4, 5):
        r.set(f"user:{i}", "row")
    with env.connect() as conn:
        # Written by hand: element 1's id is an array, which no template can render.
        bad = conn.execute(
            "INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row, rows) "
            "VALUES ('public', 'users', 'I', %s, 3) RETURNING id",
            ['{"id": ["1", ["2"], "3"], "email": ["a", "b", "c"]}'],
        ).fetchone()
        # A malformed pack (arrays shorter than its rows): parked whole.
        broken = conn.execute(
            "INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op, new_row, rows) "
            "VALUES ('public', 'users', 'I', %s, 3) RETURNING id",
            ['{"id": ["4"], "email": ["d"]}'],
        ).fetchone()
    assert bad is not None
    assert broken is not None
    with listening(config):
        env.sql("INSERT INTO users VALUES (5, 'e', 'n')")  # after them: not blocked
        wait_until(lambda: r.exists("user:5") == 0, what="the change after the bad packs")
        settle(env, r)
    # The pack's good elements were invalidated; the bad one, and the malformed pack, not.
    assert keys(r) == {"user:2", "user:4"}
    with env.connect() as conn:
        dead = dict(
            conn.execute(
                "SELECT id, error FROM cdc_invalidator.dead_letter_v1 ORDER BY id"
            ).fetchall()
        )
        copied = conn.execute(
            "SELECT rows, new_row::text FROM cdc_invalidator.dead_letter_v1 WHERE id = %s",
            [bad[0]],
        ).fetchone()
    assert sorted(dead) == [bad[0], broken[0]]
    assert "1 element(s) failed" in dead[bad[0]], dead
    assert "element 1: " in dead[bad[0]], dead
    assert "element 0" not in dead[bad[0]], dead
    assert "expected an array of 3" in dead[broken[0]], dead
    assert copied == (3, '{"id": ["1", ["2"], "3"], "email": ["a", "b", "c"]}')


def test_replay_and_explain_read_packed_changes(env: Env) -> None:
    rows = 2_500
    users_table(env, rows=rows)
    config = install(env, USERS, replay_history="1h", second_delete_ms=0)
    r = env.redis()
    cache_users(r, range(1, rows + 1))
    with listening(config):
        env.sql("UPDATE users SET email = 'new' || id || '@x'")
        wait_until(lambda: not keys(r), what="the UPDATE invalidated")
        # The queue keeps its rows for replay_history: wait for the saved position.
        wait_until(
            lambda: env.scalar(f"SELECT bool_and({PROCESSED}) {FROM_QUEUE}"),
            what="the UPDATE acknowledged",
        )
    # An old backup of Redis brought back: replay deletes every key again.
    cache_users(r, range(1, rows + 1))
    r.set("session:1", "fresh")
    done = run_cli("replay", "--since", "15m", "--config", str(config))
    assert done.returncode == 0, done.stderr
    # Each row's old and new email key and its id key (the sync table has none cached).
    assert f"{2 * rows} keys were back and are deleted again" in done.stdout, done.stdout
    assert keys(r) == {"session:1"}

    # explain finds the change inside its pack, with the row's own values.
    done = run_cli("explain", "user:email:u1234@x", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "1 change(s) in the history invalidated it" in done.stdout, done.stdout
    line = next(x for x in done.stdout.splitlines() if "UPDATE of public.users" in x)
    assert "email='u1234@x', id='1234'" in line, line
    assert "deleted: the listener's saved progress has passed it" in line, line


def test_a_judged_bulk_update_queues_only_the_rows_whose_counted_columns_changed(
    env: Env,
) -> None:
    users_table(env, rows=5_000)
    config = env.config({**USERS, **SYNC}, batch_size=BATCH)
    header = '[tables."public.users"]\n'
    text = config.read_text()
    assert header in text
    config.write_text(text.replace(header, header + 'ignore_columns = ["name"]\n'))
    env.sql("CREATE TABLE sync (id int PRIMARY KEY)")
    assert main(["install", "--config", str(config)]) == 0
    r = env.redis()
    cache_users(r, range(1, 5_001))

    env.sql("UPDATE users SET name = 'ignored'")  # no counted column changed
    assert queue_len(env) == 0
    # 3,000 rows of which only the even ids change a counted column.
    env.sql(
        "UPDATE users SET email = CASE WHEN id % 2 = 0 THEN 'e' || id ELSE email END "
        "WHERE id <= 3000"
    )
    assert queue_len(env) == 1_500
    # A changed primary key: judged as a DELETE of the old row and an INSERT of the new.
    env.sql("UPDATE users SET id = id + 10000 WHERE id > 4000")
    assert {op for op, _ in packs(env)} == {"U", "D", "I"}
    assert queue_len(env) == 1_500 + 2 * 1_000
    with listening(config):
        settle(env, r)
    left = keys(r)
    assert not any(f"user:{i}" in left for i in range(2, 3001, 2))
    assert all(f"user:{i}" in left for i in range(1, 3001, 2))
    assert not any(f"user:{i}" in left for i in range(4001, 5001))
    assert all(f"user:{i}" in left for i in range(3001, 4001))


def test_tail_shows_each_row_of_a_packed_change_with_its_transaction(
    env: Env, spawn: Spawn, started_tail: StartedTails
) -> None:
    config = setup_users(env, rows=300)
    listener = spawn(config)
    tail = started_tail(env, config, "--table", "users")

    # The listener asks whether anyone tails once a second at most: write packs (three
    # rows a statement, once the last one is consumed) until one is shown.
    seen: list[Written] = []
    shown: list[dict[str, str]] = []

    def a_pack_shown() -> bool:
        lines = [m.groupdict() for m in map(LINE.match, tail.lines()) if m]
        if len(lines) >= 3:
            shown.extend(lines[:3])
            return True
        if not seen or acknowledged(env, seen[-1]):
            first = 3 * len(seen) + 1
            update = "UPDATE users SET email = 'x' || id WHERE id BETWEEN %s AND %s"
            seen.append(write(env, update, [first, first + 2], ids=range(first, first + 3)))
        return False

    wait_until(a_pack_shown, what="a packed change shown by tail", timeout_s=30)
    first = int(shown[0]["keys"].split()[0].removeprefix("user:"))
    # One line per row of the pack, each with its own keys and the pack's transaction.
    assert [line["keys"].split() for line in shown] == [
        [f"user:{i}", f"user:email:u{i}@x", f"user:email:x{i}"] for i in range(first, first + 3)
    ]
    assert {line["op"] for line in shown} == {"UPDATE"}
    assert len({line["txn"] for line in shown}) == 1
    assert re.fullmatch(r"xid \d+", shown[0]["txn"]), shown
    assert tail.interrupt() == 0, tail.stderr()
    stop_listener(listener)
