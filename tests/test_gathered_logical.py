"""Logical mode and a large transaction sent once committed (below
logical_decoding_work_mem, so not streamed): its changes from GATHER_AFTER on are
gathered column-wise by the C walk (capture/packs.py), mapped a template at a time, and
kept in the replay history as items of seven, each naming its transaction. Against real
servers: the keys, the history, explain, dead letters, and a key column that moves
inside the transaction. (Each message gathered against the Decoder's event for it:
test_packs.)"""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from cdc_invalidator.capture.logical import GATHER_AFTER
from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.logical import active, install, logical_config, stop, the_dead_letter
from tests.support.waits import wait_until

pytestmark = pytest.mark.servers

Spawn = Any  # conftest's spawn fixture: config -> ListenerProcess

N = 20 * GATHER_AFTER  # rows: most of them gathered; far below 64MB of changes
BIG = {"public.big": ["big:{id}", "big:name:{name}"]}
SMALL = {"public.small": ["small:{id}"]}


def setup(env: Env, spawn: Spawn, *, replay_history: str = "0s") -> Any:
    """big and small, installed; a listener streaming (second deletes off: each test
    reads which keys are gone)."""
    env.sql(
        "CREATE TABLE big (id int PRIMARY KEY, name text);"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        "CREATE TABLE other (id int PRIMARY KEY);"
        f"INSERT INTO big SELECT g, 'n' || g FROM generate_series(1, {N}) g;"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 10) g"
    )
    tables = {**BIG, **SMALL}
    config = logical_config(
        env, tables, log_level="debug", second_delete_ms=0, replay_history=replay_history
    )
    install(config)
    # `other` is published by hand, and no installed mapping names it: its changes are
    # dead letters. (A table an install named is rendered with its templates.)
    env.sql("ALTER PUBLICATION cdc_invalidator ADD TABLE other")
    listener = spawn(config)
    wait_until(lambda: active(env), what="the listener streaming its slot")
    return listener, config


def xid_of(writer: psycopg.Connection[Any]) -> int:
    row = writer.execute("SELECT txid_current()").fetchone()
    assert row is not None
    return int(row[0]) & 0xFFFFFFFF  # as the stream names it (32 bits)


def history(env: Env) -> list[tuple[int, int, str | None]]:
    """(items' length, changes, the xid it names) of each history item of `big`."""
    with env.connect() as conn:
        rows = conn.execute(
            "SELECT json_array_length(e),"
            " CASE WHEN json_array_length(e) = 7 THEN (e->>6)::int ELSE 1 END, e->5->>0"
            " FROM cdc_invalidator.history_v1, json_array_elements(events) e"
            " WHERE e->>1 = 'big'"
        ).fetchall()
    return [(int(a), int(b), c) for a, b, c in rows]


def test_a_large_transaction_has_every_key_deleted_and_its_history_column_wise(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    """UPDATEs, a DELETE and an INSERT of `big`, with `small` changed between them: the
    changes of both tables interleaved in one transaction, every key deleted, and each
    history item of `big` naming the transaction, most of them column-wise."""
    listener, config = setup(env, spawn, replay_history="1h")
    r = env.redis()
    half = N // 2
    keys = [f"big:{i}" for i in range(1, N + GATHER_AFTER + 1)]
    keys += [f"big:name:n{i}" for i in range(1, N + 1)]
    keys += [f"big:name:x{i}" for i in range(1, half + 1)]  # the new names: negatively cached
    keys += [f"big:name:y{i}" for i in range(N + 1, N + GATHER_AFTER + 1)]
    keys += ["small:1", "small:2"]
    r.mset(dict.fromkeys(keys, "cached"))
    with psycopg.connect(env.dsn) as writer:
        xid = xid_of(writer)
        writer.execute("UPDATE big SET name = 'x' || id WHERE id <= %s", [half])
        writer.execute("UPDATE small SET note = 'y' WHERE id = 1")
        writer.execute("DELETE FROM big WHERE id > %s", [half])
        writer.execute("UPDATE small SET note = 'y' WHERE id = 2")
        writer.execute(
            "INSERT INTO big SELECT g, 'y' || g FROM generate_series(%s::int, %s::int) g",
            [N + 1, N + GATHER_AFTER],
        )
    wait_until(lambda: r.exists(*keys) == 0, what="every key of the transaction deleted")
    assert not listener.logged("transaction_streaming")  # (sent once committed)
    changes = N + GATHER_AFTER

    # (written behind the loop, after the deletes)
    wait_until(lambda: sum(n for _, n, _ in history(env)) >= changes, what="its history")
    items = history(env)
    assert sum(n for _, n, _ in items) == changes
    packed = [(n, x) for length, n, x in items if length == 7]
    assert sum(n for n, _ in packed) >= changes - GATHER_AFTER
    assert len(packed) < 10  # column-wise: an item per kind of change, not one per row
    assert {x for _, x in packed} == {str(xid)}
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0

    # explain finds a gathered change by its key, with its transaction.
    r.set(f"big:name:x{half}", "refilled")
    capsys.readouterr()
    assert main(["explain", f"big:name:x{half}", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 change(s) in the history invalidated it" in out, out
    line = next(x for x in out.splitlines() if "UPDATE of public.big" in x)
    assert re.search(rf"xid {xid}, commit LSN [0-9A-F]+/[0-9A-F]+$", line), line

    # A replay (after a restore) deletes every key again, the gathered items mapped
    # column-wise: every change counted.
    r.mset(dict.fromkeys(keys, "restored"))
    assert main(["replay", "--since", "1h", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert r.exists(*keys) == 0
    assert f"replayed {changes + 2} invalidations" in out, out
    stop(listener)


def test_a_large_transaction_keeps_truncate_and_dead_letters_among_its_gathered_changes(
    env: Env, spawn: Spawn
) -> None:
    """A change of a table the listener does not know, between gathered ones: a dead
    letter naming the transaction; a TRUNCATE in it sweeps; every key of the gathered
    changes before and after is deleted."""
    listener, _ = setup(env, spawn)
    r = env.redis()
    half = N // 2
    keys = [f"big:{i}" for i in range(1, N + 1)]
    keys += [f"big:name:{p}{i}" for i in range(1, N + 1) for p in "nz"]
    keys += ["small:1", "small:2"]
    r.mset(dict.fromkeys(keys, "cached"))
    with psycopg.connect(env.dsn) as writer:
        xid = xid_of(writer)
        writer.execute("UPDATE big SET name = 'z' || id WHERE id <= %s", [half])
        writer.execute("INSERT INTO other VALUES (1)")
        writer.execute("TRUNCATE small")
        writer.execute("UPDATE big SET name = 'z' || id WHERE id > %s", [half])
    wait_until(lambda: r.exists(*keys) == 0, what="every key of the transaction deleted")
    table, error = the_dead_letter(env)
    assert table == "other"
    assert "not in the configuration" in error
    assert f"transaction {xid}" in error
    stop(listener)


def test_a_key_column_moved_inside_a_large_transaction_is_read_where_it_is_now(
    env: Env, spawn: Spawn
) -> None:
    """A column dropped and another added inside the transaction: `name` moves from the
    third column to the second, the tuples keep three. The server describes the relation
    again before the changes after; the packs gathered before are closed (a walk kept
    from before would read the new third column as `name`, and leave those keys)."""
    env.sql(
        "CREATE TABLE wide (id int PRIMARY KEY, note text, name text);"
        f"INSERT INTO wide SELECT g, 'x', 'n' || g FROM generate_series(1, {N}) g"
    )
    tables = {"public.wide": ["wide:{id}", "wide:name:{name}"]}
    config = logical_config(env, tables, log_level="debug", second_delete_ms=0)
    install(config)
    listener = spawn(config)
    wait_until(lambda: active(env), what="the listener streaming its slot")
    r = env.redis()
    ids = range(1, N + 1)
    keys = [f"wide:{i}" for i in ids] + [f"wide:name:{p}{i}" for i in ids for p in "nab"]
    r.mset(dict.fromkeys(keys, "cached"))
    with psycopg.connect(env.dsn) as writer:
        writer.execute("UPDATE wide SET name = 'a' || id")
        writer.execute("ALTER TABLE wide DROP COLUMN note")
        writer.execute("ALTER TABLE wide ADD COLUMN note2 text")
        writer.execute("UPDATE wide SET name = 'b' || id")
    wait_until(lambda: r.exists(*keys) == 0, what="both statements' keys deleted")
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
    assert not listener.logged("transaction_streaming")
    stop(listener)
