"""`cdc-invalidator explain KEY`: which templates produce a key and from which values
(pure), and against a real listener in both modes: the change that deleted the key,
with its commit time and transaction, or "nothing in the history" and how far back it
reaches; whether Redis holds the key now."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cdc_invalidator.capture.rows import RowDecoder, Transaction, encode_history
from cdc_invalidator.cli import main
from cdc_invalidator.events import ChangeEvent, Op, TableName
from cdc_invalidator.mapping import KeyTemplate
from cdc_invalidator.mapping.invert import matches
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.faults import acknowledged, write
from tests.support.listener import Spawn, stop_listener
from tests.support.servers import free_port
from tests.support.waits import wait_until

TEMPLATES = ["user:{id}", "user:email:{email|lower}", "user:h:{email|trim|md5}"]


def fields(template: str, key: str) -> list[list[tuple[str, str | None, bool]]]:
    return [
        [(f.column, f.value, f.exact) for f in m.fields]
        for m in matches(KeyTemplate.parse(template), key)
    ]


def test_a_key_is_read_back_through_its_template_and_filters() -> None:
    assert fields("user:{id}", "user:42") == [[("id", "42", True)]]
    assert fields("user:{id}", "session:42") == []
    # lower: the value up to case; a key with an upper-case letter is not lower's.
    assert fields("user:email:{email|lower}", "user:email:ann@x.org") == [
        [("email", "ann@x.org", False)]
    ]
    assert fields("user:email:{email|lower}", "user:email:Ann@x.org") == []
    assert fields("c:{code|trim}", "c: a") == []
    # A digest: hex of its length, and no value to name.
    assert fields("user:h:{email|md5}", "user:h:" + "0a" * 16) == [[("email", None, False)]]
    assert fields("user:h:{email|md5}", "user:h:nothex") == []
    assert fields("user:h:{email|sha1}", "user:h:" + "0a" * 16) == []
    # urlencode has one value before it.
    assert fields("q:{term|urlencode}", "q:a%20b%2Fc") == [[("term", "a b/c", True)]]
    assert fields("q:{term|urlencode}", "q:a b") == []
    # A literal inside a value: every split.
    assert fields("order:{id}:{user}", "order:1:2:3") == [
        [("id", "1", True), ("user", "2:3", True)],
        [("id", "1:2", True), ("user", "3", True)],
    ]
    assert fields("static", "static") == [[]]


def offline(tmp_path: Path) -> Path:
    closed = free_port()
    return write_config(
        tmp_path / "c.toml",
        database_url=f"postgresql://app@127.0.0.1:{closed}/app",
        redis_url=f"redis://127.0.0.1:{closed}",
        tables={"public.users": TEMPLATES},
    )


def test_a_key_no_template_produces_is_said_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["explain", "session:9", "--config", str(offline(tmp_path))])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "no configured template can produce 'session:9'" in out
    assert "in Redis now: unknown (Redis: ConnectionError" in out


def test_an_unreachable_database_exits_1_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["explain", "user:1", "--config", str(offline(tmp_path))])
    out, err = capsys.readouterr()
    assert code == 1
    assert "template 'user:{id}' with id = '1'" in out
    assert "cannot connect to PostgreSQL" in err
    assert "Traceback" not in err


# --- against a real listener -----------------------------------------------------------


@pytest.mark.servers
@pytest.mark.usefixtures("capture")
def test_explain_finds_the_change_that_deleted_a_key(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    env.sql("INSERT INTO users VALUES (1, 'Ann@X.org'), (2, 'bob@x.org')")
    config = env.config({"public.users": TEMPLATES}, replay_history="1h")
    assert main(["install", "--config", str(config)]) == 0
    listener = spawn(config)
    r = env.redis()
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    r.set("user:email:ann@x.org", "stale")
    done = write(env, "UPDATE users SET email = 'ann@y.org' WHERE id = 1", ids=range(1, 2))
    wait_until(lambda: r.exists("user:email:ann@x.org") == 0, what="the key deleted")
    wait_until(lambda: acknowledged(env, done), what="the change acknowledged")
    xid = (
        env.scalar("SELECT max(xid)::text FROM cdc_invalidator.queue_v1")
        if not env.logical
        else None
    )
    r.set("user:email:ann@x.org", "refilled", ex=300)  # a reader put it back
    capsys.readouterr()

    assert main(["explain", "user:email:ann@x.org", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert (
        "public.users: template 'user:email:{email|lower}' with email = 'ann@x.org' up to "
        "case (lower)" in out
    ), out
    assert re.search(r"in Redis now: yes, expires in (29\d|300) s", out), out
    assert "1 change(s) in the history invalidated it" in out, out
    line = next(x for x in out.splitlines() if "UPDATE of public.users" in x)
    assert "(old row email='Ann@X.org', id='1')" in line, line
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    if env.logical:
        assert re.search(
            rf"committed {stamp}: .*; deleted by {stamp} \(at most \d+ ms after the commit\); "
            r"xid \d+, commit LSN [0-9A-F]+/[0-9A-F]+$",
            line,
        ), line
    else:
        assert re.search(rf"(committed|transaction began) {stamp}: ", line), line
        assert "deleted: the listener's saved progress has passed it" in line, line
        assert line.endswith(f"; xid {xid}"), line
    assert "the history reaches back to " in out

    # A key of ours that no change touched: said plainly, with the history's reach.
    assert main(["explain", "user:2", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "in Redis now: no" in out
    assert re.search(
        rf"nothing in the history invalidated this key: the history reaches back to {stamp} "
        r"\(\d+s ago; \d+ (queue rows|rows); replay_history = 1h\)",
        out,
    ), out
    # A TRUNCATE sweeps every key of the table's templates: explain says so.
    swept = write(env, "TRUNCATE users", ids=range(0))
    wait_until(lambda: acknowledged(env, swept), what="the TRUNCATE acknowledged")
    assert main(["explain", "user:2", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 change(s) in the history invalidated it" in out, out
    assert re.search(r": TRUNCATE of public.users \(swept\); ", out), out
    stop_listener(listener)


def test_history_rows_carry_each_transaction_on_its_first_event() -> None:
    users = TableName("public", "users")
    events = [
        ChangeEvent(users, Op.UPDATE, {"id": "1"}, {"id": "1"}, position)
        for position in (5, 6, 7, 9)
    ]
    # (first position, xid, commit LSN, commit time): 5-6 one transaction, 7-9 another.
    text = encode_history(events, [(5, 700, 0x1000, 11), (7, 701, 0x2000, 22)])
    assert [len(item) for item in json.loads(text)] == [6, 5, 6, 5]
    transactions: list[Transaction | None] = []
    decoded = RowDecoder().history_row(3, text, transactions)
    assert len(decoded.events) == 4
    first, second = (700, 0x1000, 11), (701, 0x2000, 22)
    assert transactions == [first, first, second, second]
    # Rows written before transactions were recorded: five per event, none known.
    old: list[Transaction | None] = []
    assert len(RowDecoder().history_row(3, encode_history(events), old).events) == 4
    assert old == [None] * 4
