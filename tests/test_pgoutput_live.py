"""pgoutput on the server this run uses (`--pg`) against the messages recorded once, on
PostgreSQL 15, in tests/data/pgoutput.json (which tests/test_pgoutput.py decodes without
a server): every scenario of tests/data/record_pgoutput.py, run live, must give the same
kinds of messages in the same order, decoded to the same changes. A PostgreSQL that
sends protocol version 1 differently fails here, naming the scenario."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_invalidator.capture.pgoutput import Decoder, by_name
from cdc_invalidator.events import ChangeEvent, TableName
from tests.data.record_pgoutput import record_all
from tests.support.env import Servers

PAGES = TableName("public", "pages")
RECORDED: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "pgoutput.json").read_text()
)


def decoded(messages: list[str], toasted: str) -> list[Any]:
    """What the Decoder makes of them: each result's kind, and each change as table, op,
    old and new values (the scenario's random TOASTed value named, not spelt)."""
    # pages' unchanged TOASTed slug is not sent (REPLICA IDENTITY DEFAULT): not asked for.
    decoder = Decoder(by_name(lambda table: ["id", "title"] if table == PAGES else None))
    out: list[Any] = []
    for message in messages:
        result = decoder.decode(bytes.fromhex(message))
        changes = result if isinstance(result, list) else [result]
        for change in changes:
            if not isinstance(change, ChangeEvent):
                out.append(type(change).__name__)
                continue
            rows = [
                None
                if row is None
                else {k: "<toasted>" if v == toasted else v for k, v in row.items()}
                for row in (change.old, change.new)
            ]
            out.append((str(change.table), change.op, *rows))
    return out


@pytest.mark.timeout(120)
def test_live_pgoutput_messages_match_the_recorded_ones(own_servers: Servers) -> None:
    with psycopg.connect(own_servers.pg_dsn("postgres"), autocommit=True) as conn:
        version = conn.info.server_version
        # Decoding reads flushed WAL only; the test servers do not wait for the flush.
        conn.execute("SET synchronous_commit = on")
        live = record_all(conn)
    assert sorted(live) == sorted(RECORDED)
    changes = 0
    for name, messages in RECORDED.items():
        if name == "_values":
            continue
        kinds = [chr(int(m[:2], 16)) for m in messages]
        assert [chr(int(m[:2], 16)) for m in live[name]] == kinds, (name, version)
        expected = decoded(messages, RECORDED["_values"]["pages_full.slug"])
        assert decoded(live[name], live["_values"]["pages_full.slug"]) == expected, (name, version)
        changes += sum(isinstance(result, tuple) for result in expected)
    assert changes > 20  # the comparison was of changes, not of empty lists
