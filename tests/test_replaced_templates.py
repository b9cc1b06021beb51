"""A table the configuration still names whose templates (or redis_db) an `install`
replaced, the listener stopped across that install: a change committed before it is
rendered with the templates it was captured under too, one committed after it with the
new ones only."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.support.env import FAST_PG, Env, Servers, make_env
from tests.support.listener import ListenerProcess, Spawn, cli, stop_listener
from tests.support.servers import PostgresServer, RedisServer
from tests.support.waits import wait_until

pytestmark = [pytest.mark.usefixtures("capture"), pytest.mark.servers]

USERS = {"public.users": ["user:{id}"]}
OTHER_DB = 2


def three_orders(env: Env) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL);"
        "INSERT INTO users VALUES (1, 'A');"
        "INSERT INTO orders SELECT g, 0 FROM generate_series(1, 3) g"
    )


def row_1_changed_under(env: Env, template: str, cached: list[str]) -> Path:
    """orders installed with `template`, the `cached` keys set, row 1 changed under it
    (no listener running); the file that gives orders b:{id} instead, written, not
    installed."""
    first = env.config({**USERS, "public.orders": [template]}, name="first.toml")
    assert cli("install", "--config", first) == 0
    env.redis().mset(dict.fromkeys(cached, "cached"))
    env.sql("UPDATE orders SET user_id = 1 WHERE id = 1")  # under `template`
    return env.config({**USERS, "public.orders": ["b:{id}"]}, name="second.toml")


def wait_for_the_boundary(listener: ListenerProcess) -> None:
    """Until the listener logs its eras with every boundary known (install's recorded)."""
    wait_until(
        lambda: any(
            line.get("event") == "rendering_changes_of_earlier_mappings"
            and all(era["from_below"][1] is not None for era in line["eras"])
            for line in listener.lines()
        ),
        what="the boundary of the install seen",
    )


@pytest.mark.parametrize("capture", ["trigger", "logical"])
@pytest.mark.parametrize("replaced", ["templates", "redis_db"])
def test_a_change_captured_before_templates_were_replaced_deletes_the_old_key(
    env: Env, spawn: Spawn, replaced: str
) -> None:
    """orders installed with a:{id}; the listener stopped; row 1 changed, rows 5 and 6
    in one statement (a trigger pack), rows 100 to 199 in another (logical mode maps
    such a transaction column-wise); install with orders given b:{id} (or a:{id} in
    Redis database 2); row 2 changed, and rows 200 to 299; the listener started on that
    file. It deleted the b:N only and a:1, a:5, a:6, a:100..a:199 stayed cached
    (PostgreSQL 15, both modes): the old app's keys of changes committed under the old
    mapping. Now the changes captured before the install are rendered with the old
    templates too, and those after it with the new ones only: a:2, a:200..a:299 stay."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL);"
        "INSERT INTO users VALUES (1, 'A');"
        "INSERT INTO orders SELECT g, 0 FROM generate_series(1, 300) g"
    )
    r = env.redis()
    other = redis.Redis.from_url(env.redis_url.rsplit("/", 1)[0] + f"/{OTHER_DB}")
    second, later = ("b:{id}", r) if replaced == "templates" else ("a:{id}", other)
    first = env.config({**USERS, "public.orders": ["a:{id}"]}, name="first.toml")
    assert cli("install", "--config", first) == 0
    old_keys = ["a:1", "a:5", "a:6", *(f"a:{i}" for i in range(100, 200))]
    new_keys = [second.format(id=i) for i in (1, 5, 6, 2, 150, 250)]
    kept = ["a:2", "a:3", *(f"a:{i}" for i in range(200, 300))]
    r.mset({**dict.fromkeys(old_keys, "cached"), **dict.fromkeys(kept, "cached")})
    later.mset({**dict.fromkeys(new_keys, "cached"), second.format(id=3): "cached"})
    r.set("user:1", "cached")
    env.sql("UPDATE orders SET user_id = 1 WHERE id = 1")  # under a:{id}
    env.sql("UPDATE orders SET user_id = 1 WHERE id IN (5, 6)")  # a pack, likewise
    # (a transaction of more changes than logical mode maps one by one: column-wise)
    env.sql("UPDATE orders SET user_id = 1 WHERE id BETWEEN 100 AND 199")
    replacing = env.config({**USERS, "public.orders": [second]}, name="second.toml")
    if replaced == "redis_db":
        with replacing.open("a") as f:
            f.write(f"redis_db = {OTHER_DB}\n")  # the last table written: orders
    assert cli("install", "--config", replacing) == 0
    env.sql("UPDATE orders SET user_id = 1 WHERE id = 2")  # under the new mapping
    env.sql("UPDATE orders SET user_id = 1 WHERE id BETWEEN 200 AND 299")  # likewise
    env.sql("UPDATE users SET name = 'B' WHERE id = 1")
    listener = spawn(replacing)
    wait_until(lambda: r.exists("user:1") == 0, what="the listener caught up")
    time.sleep(1)
    stop_listener(listener)
    left_old = [k for k in old_keys if r.exists(k)]
    left_new = [k for k in new_keys if later.exists(k)]
    assert (left_old, left_new) == ([], [])
    # Captured after the install: not rendered with the old templates (no double work).
    assert [k for k in kept if not r.exists(k)] == []
    assert (r.exists("a:3"), later.exists(second.format(id=3))) == (1, 1)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.mark.parametrize("capture", ["trigger", "logical"])
def test_a_listener_started_on_the_edited_file_before_install_deletes_the_old_keys(
    env: Env, spawn: Spawn
) -> None:
    """The documented order: orders installed with a:{id}; the file edited to b:{id}
    and the listener (re)started on it; row 1 changed (queued by the installed
    capture, a:{id}'s); then install; row 2 changed. The listener rendered row 1 with
    b:{id} only and a:1 stayed cached (PostgreSQL 15). Now, while its mapping is not
    installed, it renders the installed mapping's templates too, and once install
    recorded where its capture began, the rows queued after that with b:{id} only:
    a:2 stays cached. Logical mode likewise (it rendered row 1 with b:{id} only too, and
    never asked for the boundary)."""
    three_orders(env)
    r = env.redis()
    first = env.config({**USERS, "public.orders": ["a:{id}"]}, name="first.toml")
    assert cli("install", "--config", first) == 0
    r.mset(dict.fromkeys(["a:1", "b:1", "a:2", "b:2", "a:3", "b:3"], "cached"))
    edited = env.config({**USERS, "public.orders": ["b:{id}"]}, name="edited.toml")
    listener = spawn(edited)
    try:
        env.sql("UPDATE orders SET user_id = 1 WHERE id = 1")  # under a:{id}
        wait_until(lambda: r.exists("b:1") == 0, what="row 1's b:1 deleted")
        wait_until(lambda: r.exists("a:1") == 0, what="row 1's a:1 deleted", timeout_s=2)
        assert cli("install", "--config", edited) == 0
        wait_for_the_boundary(listener)
        env.sql("UPDATE orders SET user_id = 1 WHERE id = 2")  # under b:{id}
        wait_until(lambda: r.exists("b:2") == 0, what="row 2's b:2 deleted")
        time.sleep(1)
    finally:
        stop_listener(listener)
    assert (r.exists("a:2"), r.exists("a:3"), r.exists("b:3")) == (1, 1, 1)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.mark.parametrize("capture", ["trigger", "logical"])
def test_an_earlier_template_of_a_column_the_new_ones_do_not_use_is_rendered(
    env: Env, spawn: Spawn
) -> None:
    """orders installed with a:{code}; the listener stopped; row 1 changed (not its
    code); install with orders given b:{id} only; the listener started on that file.
    Logical mode decoded only the columns of the listener's own templates, so row 1's
    change had no code, a:{code} could not be rendered, and a:c1 stayed cached
    (PostgreSQL 15). Now a table's earlier templates' columns are decoded too."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, code text NOT NULL, user_id int);"
        "INSERT INTO users VALUES (1, 'A');"
        "INSERT INTO orders SELECT g, 'c' || g, 0 FROM generate_series(1, 2) g"
    )
    r = env.redis()
    second = row_1_changed_under(env, "a:{code}", ["a:c1", "a:c2", "b:1", "b:2", "user:1"])
    assert cli("install", "--config", second) == 0
    env.sql("UPDATE orders SET user_id = 1 WHERE id = 2")  # under b:{id}
    env.sql("UPDATE users SET name = 'B' WHERE id = 1")
    listener = spawn(second)
    # (all of them: a sweep behind the loop may end after user:1 is deleted)
    wait_until(lambda: r.exists("user:1", "a:c1", "b:1", "b:2") == 0, what="the keys deleted")
    stop_listener(listener)
    assert r.exists("a:c2") == 1  # captured after the install
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


# How orders.code, which only the first mapping's template uses, reaches a listener of
# the second: of a domain dropped after the install (its changes' Relation messages name
# a type that is gone), or a generated column (no publication carries one before 18).
CODE_COLUMNS = {
    "domain": (
        "CREATE DOMAIN order_code AS text;",
        "code order_code",
        "ALTER TABLE orders ALTER code TYPE text; DROP DOMAIN order_code",
    ),
    "generated": ("", "code text GENERATED ALWAYS AS ('c' || id) STORED", ""),
    # (expand/contract: the new templates do not use code, so it is dropped after)
    "generated_dropped": (
        "",
        "code text GENERATED ALWAYS AS ('c' || id) STORED",
        "ALTER TABLE orders DROP COLUMN code",
    ),
}


@pytest.mark.parametrize("capture", ["trigger", "logical"])
@pytest.mark.parametrize("code", list(CODE_COLUMNS))
def test_an_earlier_template_of_a_column_that_cannot_be_decoded_is_swept(
    env: Env, spawn: Spawn, code: str
) -> None:
    """orders installed with a:{code}; the listener stopped; row 1 changed; install
    with orders given b:{id} only; the listener started on that file. In logical mode,
    where code's type was a domain dropped after the install (its Relation message names
    a type that is gone), or code is a generated column (PostgreSQL 15 publishes none),
    the listener left code out and rendered nothing with a:{code}: a:c1 stayed cached,
    without a warning (PostgreSQL 15, both kinds), where a listener of the first file
    sweeps a:* for that change. Now that template is swept for such a change, and that
    is logged once."""
    before, column, after = CODE_COLUMNS[code]
    env.sql(
        f"{before}"
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        f"CREATE TABLE orders (id int PRIMARY KEY, {column}, user_id int);"
        "INSERT INTO users VALUES (1, 'A');"
        "INSERT INTO orders (id, user_id) SELECT g, 0 FROM generate_series(1, 2) g"
    )
    if code == "domain":
        env.sql("UPDATE orders SET code = 'c' || id")
    r = env.redis()
    second = row_1_changed_under(env, "a:{code}", ["a:c1", "b:1", "user:1"])
    assert cli("install", "--config", second) == 0
    if after:
        env.sql(after)
    env.sql("UPDATE users SET name = 'B' WHERE id = 1")
    listener = spawn(second)
    try:
        wait_until(lambda: r.exists("user:1") == 0, what="the listener caught up")
        # (trigger mode sweeps b:* for row 1, captured without id: a sweep may end later)
        wait_until(lambda: r.exists("a:c1", "b:1") == 0, what="a:c1 and b:1 deleted", timeout_s=3)
    finally:
        stop_listener(listener)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.mark.parametrize("capture", ["trigger", "logical"])
def test_a_column_filter_added_with_new_templates_judges_only_the_changes_after_it(
    env: Env, spawn: Spawn
) -> None:
    """orders installed with a:{email} (and x:{id}), no column filter; the listener
    stopped; row 1's note changed; install with orders given b:{id} and ignore_columns =
    ["note", "email"]; row 2's note changed, then row 2's email; the listener started on
    that file. Logical mode judged row 1's UPDATE with the new filter, found only ignored
    columns changed and skipped it: a:e1 stayed cached (PostgreSQL 15), though the old
    app's key held the note. And it counted email, only the earlier template's column,
    as changed by every UPDATE since (b:2 deleted for row 2's new email, which trigger
    mode, and the configuration, ignore). Now a change committed under an earlier
    mapping is not judged by the new filter, and the earlier columns count for none."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, email text, note text);"
        "INSERT INTO users VALUES (1, 'A');"
        "INSERT INTO orders SELECT g, 'e' || g, 'n' FROM generate_series(1, 2) g"
    )
    r = env.redis()
    # (x:{id}: trigger mode's capture copies id too, so b:{id} renders row 1, unswept)
    first = env.config({**USERS, "public.orders": ["a:{email}", "x:{id}"]}, name="first.toml")
    assert cli("install", "--config", first) == 0
    r.mset(dict.fromkeys(["a:e1", "a:e2", "b:2", "user:1"], "cached"))
    env.sql("UPDATE orders SET note = 'x' WHERE id = 1")  # under a:{email}: no filter
    second = env.config({**USERS, "public.orders": ["b:{id}"]}, name="second.toml")
    header = '[tables."public.orders"]\n'
    text = second.read_text()
    assert header in text
    second.write_text(text.replace(header, header + 'ignore_columns = ["note", "email"]\n'))
    assert cli("install", "--config", second) == 0
    env.sql("UPDATE orders SET note = 'x' WHERE id = 2")  # under b:{id}: ignored
    env.sql("UPDATE orders SET email = 'f2' WHERE id = 2")  # likewise
    env.sql("UPDATE users SET name = 'B' WHERE id = 1")
    listener = spawn(second)
    try:
        wait_until(lambda: r.exists("user:1") == 0, what="the listener caught up")
        wait_until(lambda: r.exists("a:e1") == 0, what="a:e1 deleted", timeout_s=3)
    finally:
        stop_listener(listener)
    assert r.exists("a:e2", "b:2") == 2
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.mark.parametrize("capture", ["trigger", "logical"])
def test_a_listener_that_connects_before_install_records_its_boundary_deletes_the_old_keys(
    env: Env, spawn: Spawn
) -> None:
    """orders installed with a:{id}; the listener stopped; row 1 changed; install with
    b:{id}, its boundary's INSERT held (a lock) after its commit; the listener started
    on that file meanwhile. Its mapping installed and no boundary recorded, it rendered
    row 1 with b:{id} only and never asked again: a:1 stayed cached (PostgreSQL 15, both
    modes). Now such a mapping's earlier ones are open eras until the boundary comes."""
    three_orders(env)
    r = env.redis()
    second = row_1_changed_under(env, "a:{id}", ["a:1", "b:1", "a:2", "b:2", "user:1"])
    done: list[int] = []
    with psycopg.connect(env.dsn) as holder:
        holder.execute("LOCK TABLE cdc_invalidator.mapping_boundary_v1 IN EXCLUSIVE MODE")
        installing = threading.Thread(
            target=lambda: done.append(cli("install", "--config", second)), daemon=True
        )
        installing.start()
        wait_until(
            lambda: env.scalar("SELECT count(*) FROM cdc_invalidator.mapping_v1") == 2,
            what="install's commit",
        )
        listener = spawn(second)
        try:
            wait_until(lambda: r.exists("b:1") == 0, what="row 1's b:1 deleted")
            holder.commit()  # (the lock released: the boundary recorded)
            installing.join(30)
            assert done == [0]
            wait_until(lambda: r.exists("a:1") == 0, what="row 1's a:1 deleted", timeout_s=3)
            wait_for_the_boundary(listener)
            env.sql("UPDATE orders SET user_id = 1 WHERE id = 2")  # under b:{id}
            env.sql("UPDATE users SET name = 'B' WHERE id = 1")
            wait_until(lambda: r.exists("b:2", "user:1") == 0, what="rows 2's b:2 deleted")
        finally:
            stop_listener(listener)
    assert r.exists("a:2") == 1
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.fixture
def stamped_env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    """An Env on servers of its own whose PostgreSQL records commit timestamps."""
    pg = PostgresServer.create({**FAST_PG, "track_commit_timestamp": "on"})
    rd = RedisServer.create()
    with pg, rd:
        capture: str = request.getfixturevalue("capture")
        yield from make_env(Servers(pg.dsn, rd.url, pg, rd), tmp_path, capture=capture)


ROWS = 20_000  # more than the writers reach: each row changed at most once


@pytest.mark.parametrize("capture", ["trigger", "logical"])
def test_changes_committed_while_install_replaces_templates_delete_their_keys(
    stamped_env: Env, spawn: Spawn
) -> None:
    """Writers change rows of orders (three threads, one row a transaction) while
    install replaces a:{id} by b:{id}, the listener stopped; then it starts on the new
    file. Every change committed before install's commit (by its commit timestamp)
    has its a:N deleted; of those committed after it, only the few captured between
    the commit and the boundary install records a moment later (a queue id, a WAL
    position) are rendered with a:{id}."""
    env = stamped_env
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL);"
        "INSERT INTO users VALUES (1, 'A');"
        f"INSERT INTO orders SELECT g, 0 FROM generate_series(1, {ROWS}) g"
    )
    first = env.config({**USERS, "public.orders": ["a:{id}"]}, name="first.toml")
    assert cli("install", "--config", first) == 0
    r = env.redis()
    r.mset({f"a:{i}": "cached" for i in range(1, ROWS + 1)})
    r.set("user:1", "cached")
    done: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(first_row: int, step: int) -> None:
        try:
            with env.connect() as conn:
                for row in range(first_row, ROWS + 1, step):
                    if stop.is_set():
                        return
                    (xid,) = conn.execute(
                        "UPDATE orders SET user_id = 1 WHERE id = %s "
                        "RETURNING pg_current_xact_id()::text::bigint",
                        [row],
                    ).fetchone() or (None,)
                    assert xid is not None
                    done.append((row, int(xid)))
                    time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(1 + n, 3), daemon=True) for n in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    second = env.config({**USERS, "public.orders": ["b:{id}"]}, name="second.toml")
    assert cli("install", "--config", second) == 0
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    env.sql("UPDATE users SET name = 'B' WHERE id = 1")
    listener = spawn(second)
    wait_until(lambda: r.exists("user:1") == 0, what="the listener caught up")
    time.sleep(1)
    stop_listener(listener)
    with env.connect() as conn:
        (installed,) = conn.execute(
            "SELECT pg_xact_commit_timestamp(xmin) FROM cdc_invalidator.mapping_v1 "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone() or (None,)
        stamps = dict(
            conn.execute(
                "SELECT c.xid, pg_xact_commit_timestamp((c.xid %% 4294967296)::text::xid) "
                "FROM unnest(%s::bigint[]) AS c(xid)",
                [[xid for _row, xid in done]],
            ).fetchall()
        )
    before = [row for row, xid in done if stamps[xid] < installed]
    after = [row for row, xid in done if stamps[xid] > installed]
    assert before
    assert after
    left = [row for row in before if r.exists(f"a:{row}")]
    also_old = [row for row in after if not r.exists(f"a:{row}")]
    print(f"before {len(before)}, a:N left {len(left)}", end="; ")
    print(f"after {len(after)}, a:N deleted {len(also_old)}")
    assert left == []
    assert len(also_old) <= len(after) // 10
