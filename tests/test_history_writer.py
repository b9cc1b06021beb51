"""Logical mode's history writer (capture/history_writer.py): batches' texts gathered
into one write, writes queued behind the loop, in order, bounded in bytes, and none
after a failure. A pure unit: the connection is a stand-in that records the texts and
blocks until told to go on."""

from __future__ import annotations

import threading
from typing import Any, cast

import psycopg
import pytest

from cdc_invalidator.capture import history_writer
from cdc_invalidator.capture.history_writer import GATHER_BYTES, MAX_QUEUED_BYTES, HistoryWriter


class Conn:
    """execute() records the text once the gate opens; fails for texts in `fail`."""

    def __init__(self, fail: frozenset[str] = frozenset()) -> None:
        self.gate = threading.Event()
        self.written: list[str] = []
        self.fail = fail

    def execute(self, _sql: str, params: dict[str, Any]) -> None:
        self.gate.wait()
        if params["events"] in self.fail:
            raise psycopg.OperationalError("the server went away")
        self.written.append(params["events"])


def writer(conn: Conn) -> HistoryWriter:
    return HistoryWriter(cast("psycopg.Connection[Any]", conn))


def big(item: str) -> str:
    """A text past GATHER_BYTES: queued as soon as it is written."""
    return "[" + item * GATHER_BYTES + "]"


def test_small_texts_are_gathered_into_one_write_in_order() -> None:
    conn = Conn()
    conn.gate.set()
    history = writer(conn)
    for text in ("[1]", "[]", "[2,3]", "[4]"):
        history.write(text)
    assert conn.written == []  # gathered: nothing written, nothing queued
    history.flush()
    assert conn.written == ["[1,2,3,4]"]
    history.write("[5]")
    history.close()
    assert conn.written == ["[1,2,3,4]", "[5]"]


def test_gathered_texts_are_queued_once_the_first_is_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_writer, "GATHER_S", 0.0)
    conn = Conn()
    conn.gate.set()
    history = writer(conn)
    history.write("[1]")
    history.write("[2]")
    history.flush()
    assert conn.written == ["[1]", "[2]"]
    history.close()


def test_writes_queue_behind_the_loop_and_are_written_in_order() -> None:
    conn = Conn()
    history = writer(conn)
    texts = [big(item) for item in "123"]
    for text in texts:
        history.write(text)  # returns with the gate closed: nothing waited for
    assert conn.written == []
    conn.gate.set()
    history.flush()
    assert conn.written == texts
    history.close()


def test_the_loop_waits_once_the_queued_text_passes_its_bound() -> None:
    conn = Conn()
    history = writer(conn)
    first = "[" + "1" * (MAX_QUEUED_BYTES - 10) + "]"
    history.write(first)
    more = threading.Thread(target=history.write, args=(big("2"),))
    more.start()
    more.join(0.2)
    assert more.is_alive(), "a write past the bound did not wait for the one before"
    conn.gate.set()
    more.join()
    history.flush()
    assert conn.written == [first, big("2")]
    history.close()


def test_a_failed_write_stops_those_after_it_and_is_raised_until_closed() -> None:
    """The batches acknowledged after a failed write have no history: no later flush()
    may say otherwise, or the stream's close() would confirm them to the slot (which
    must send them again)."""
    conn = Conn(fail=frozenset({big("2")}))
    history = writer(conn)
    for item in "123":
        history.write(big(item))
    conn.gate.set()
    with pytest.raises(psycopg.OperationalError):
        history.flush()
    assert conn.written == [big("1")]  # the third was queued after the failure: not written
    with pytest.raises(psycopg.OperationalError):
        history.write("[4]")
    with pytest.raises(psycopg.OperationalError):
        history.flush()
    with pytest.raises(psycopg.OperationalError):
        history.close()
    assert conn.written == [big("1")]


def test_texts_gathered_when_a_write_fails_are_never_written() -> None:
    conn = Conn(fail=frozenset({big("1")}))
    history = writer(conn)
    history.write(big("1"))
    history.write("[2]")  # gathered behind the failing write
    conn.gate.set()
    with pytest.raises(psycopg.OperationalError):
        history.close()
    assert conn.written == []
