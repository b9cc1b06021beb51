"""Pure units: queue and history rows decoded into events, or the reason they are none
(no servers; the readers that use it are tested against real servers in test_semantics
and test_replay)."""

from __future__ import annotations

import json

import pytest

from cdc_invalidator.capture.rows import (
    RowDecoder,
    by_events,
    encode_history,
    pack_element,
    pack_position,
    queue_id,
)
from cdc_invalidator.events import ChangeEvent, Op, TableName

USERS = TableName("public", "users")
# Past Python's int conversion limit (4300 digits): json.loads refuses it.
HUGE = "9" * 5000


def test_queue_rows_decode_in_order_with_the_queue_id_as_position() -> None:
    decoded = RowDecoder().queue_rows(
        [
            (7, "public", "users", "I", None, '{"id": "1"}'),
            (8, "public", "users", "U", '{"id": "1"}', '{"id": "2"}'),
            (9, "public", "users", "T", None, None),
        ]
    )
    assert decoded.dead == []
    assert decoded.events == [
        ChangeEvent(USERS, Op.INSERT, None, {"id": "1"}, 7),
        ChangeEvent(USERS, Op.UPDATE, {"id": "1"}, {"id": "2"}, 8),
        ChangeEvent(USERS, Op.TRUNCATE, None, None, 9),
    ]


def test_queue_rows_columns_may_start_further_in() -> None:
    row = ("snapshot", "xid", 3, "public", "users", "D", '{"id": "1"}', None, 0.1)
    [event] = RowDecoder().queue_rows([row], at=2).events
    assert event == ChangeEvent(USERS, Op.DELETE, {"id": "1"}, None, 3)


def test_an_update_that_kept_its_key_columns_carries_one_row() -> None:
    [event] = RowDecoder().queue_rows([(1, "s", "t", "U", '{"id": "1"}', '{"id": "1"}')]).events
    assert event.new is event.old  # the mapper renders it once


@pytest.mark.parametrize(
    ("row", "culprits"),
    [
        ((2, "public", "users", "I", None, '{"id": ' + HUGE + "}"), ["new_row", "parse"]),
        ((2, "public", "users", "D", '{"id": ' + HUGE + "}", None), ["old_row", "parse"]),
        ((2, "public", "users", "D", "[" * 100_000 + "]" * 100_000, None), ["old_row"]),
        ((2, "public", "users", "D", "not json", None), ["old_row", "parse"]),
        ((2, "public", "users", "D", '["1"]', None), ["old_row", "list"]),
        ((2, "public", "users", "I", None, "5"), ["new_row", "int"]),
        ((2, "public", "users", "X", None, '{"id": "1"}'), ["operation", "'X'"]),
        ((2, None, "users", "I", None, '{"id": "1"}'), ["table name"]),
    ],
)
def test_a_bad_queue_row_is_dead_and_its_neighbours_are_not(
    row: tuple[object, ...], culprits: list[str]
) -> None:
    good_before = (1, "public", "users", "I", None, '{"id": "1"}')
    good_after = (3, "public", "users", "I", None, '{"id": "3"}')
    decoded = RowDecoder().queue_rows([good_before, row, good_after])
    assert [e.position for e in decoded.events] == [1, 3]
    [(position, reason)] = decoded.dead
    assert position == 2
    for culprit in culprits:
        assert culprit in reason, reason


def test_history_rows_round_trip_what_the_listener_recorded() -> None:
    events = [
        ChangeEvent(USERS, Op.UPDATE, {"id": "1", "email": None}, {"id": "1", "email": "a"}, 0),
        ChangeEvent(TableName("s", "Odd.Name"), Op.TRUNCATE, None, None, 0),
    ]
    decoded = RowDecoder().history_row(42, encode_history(events))
    assert decoded.dead == []
    assert decoded.events == [e._replace(position=42) for e in events]


def test_history_puts_each_transaction_on_its_first_event_here() -> None:
    """A transaction goes on the first event at or after its first position; of those
    that meet on one event (the ones before had no event in the batch), the last; one
    after every event goes nowhere."""
    events = [ChangeEvent(USERS, Op.DELETE, {"id": str(p)}, None, p) for p in (3, 4, 7, 8)]
    transactions = [(1, 10, 0, 0), (3, 11, 0, 0), (5, 12, 0, 0), (6, 13, 0, 0), (9, 14, 0, 0)]
    items = json.loads(encode_history(events, transactions))
    assert [item[5:] for item in items] == [[[11, 0, 0]], [], [[13, 0, 0]], []]


def test_history_that_the_fast_encoder_refuses_is_still_recorded() -> None:
    """A lone surrogate (text decoded leniently) and a position past 64 bits: orjson
    refuses both, and the history is written by json instead, read back the same."""
    events = [ChangeEvent(USERS, Op.DELETE, {"id": "\udcff", "email": "é"}, None, 0)]
    transactions = [(0, 2**70, 1, 2)]
    text = encode_history(events, transactions)
    assert json.loads(text)[0][5] == [2**70, 1, 2]
    assert RowDecoder().history_row(7, text).events == [events[0]._replace(position=7)]


@pytest.mark.parametrize(
    ("text", "kept", "culprits"),
    [
        ('[["public", "users", "D", {"id": ' + HUGE + "}, null]]", 0, ["events", "parse"]),
        ("[" * 100_000 + "]" * 100_000, 0, ["events"]),
        ('{"not": "an array"}', 0, ["events is dict", "array"]),
        ('[["public", "users", "D"]]', 0, ["event 0", "[schema, table, op, old, new]"]),
        ('[["public", "users", "D", {"id": "1"}, null], 5]', 1, ["event 1", "int"]),
        ('[["public", "users", "Q", null, null]]', 0, ["event 0", "operation"]),
        ('[["public", "users", "I", null, "x"]]', 0, ["event 0", "new_row", "str"]),
        ('[["public", 5, "T", null, null]]', 0, ["event 0", "table name"]),
    ],
)
def test_a_bad_history_row_is_dead_with_its_id(text: str, kept: int, culprits: list[str]) -> None:
    decoded = RowDecoder().history_row(42, text)
    [(position, reason)] = decoded.dead
    assert position == 42
    for culprit in culprits:
        assert culprit in reason, reason
    # The events of the row that decode still do.
    assert [e.position for e in decoded.events] == [42] * kept


# --- packs: a statement's rows in one queue row, the key columns as arrays ------------


def test_a_pack_decodes_into_one_event_per_element_with_its_own_position() -> None:
    rows = [
        (7, "public", "users", "I", None, '{"id": "1"}', None),
        (8, "public", "users", "U", '{"id": ["2", "3"]}', '{"id": ["2", "4"]}', 2),
        (9, "public", "users", "D", '{"id": ["5", null]}', None, 2),
    ]
    decoded = RowDecoder().queue_rows(rows, count_at=6)
    assert decoded.dead == []
    assert [(e.op, e.old, e.new) for e in decoded.events] == [
        (Op.INSERT, None, {"id": "1"}),
        (Op.UPDATE, {"id": "2"}, {"id": "2"}),
        (Op.UPDATE, {"id": "3"}, {"id": "4"}),
        (Op.DELETE, {"id": "5"}, None),
        (Op.DELETE, {"id": None}, None),
    ]
    positions = [e.position for e in decoded.events]
    assert positions[0] == 7
    assert [(queue_id(p), pack_element(p)) for p in positions[1:]] == [
        (8, 0),
        (8, 1),
        (9, 0),
        (9, 1),
    ]
    assert len(set(positions)) == len(positions)
    # An element whose key columns kept their values is one row for both (rendered once).
    same = decoded.events[1]
    assert same.old is same.new


def test_an_update_pack_whose_key_columns_did_not_change_shares_each_row() -> None:
    text = '{"id": ["1", "2"], "email": ["a", "b"]}'
    decoded = RowDecoder().queue_rows([(1, "public", "users", "U", text, text, 2)], count_at=6)
    assert [e.old for e in decoded.events] == [{"id": "1", "email": "a"}, {"id": "2", "email": "b"}]
    assert all(e.old is e.new for e in decoded.events)


@pytest.mark.parametrize(
    ("op", "old", "new", "rows", "reason"),
    [
        ("I", None, '{"id": ["1"]}', 2, "new_row's 'id' is list of 1, expected an array of 2"),
        ("I", None, '{"id": "1"}', 1, "new_row's 'id' is str, expected an array of 1"),
        ("D", '["1"]', None, 1, "old_row is list, expected a JSON object of arrays"),
        ("U", '{"id": ["1"]}', None, 1, "new_row is null, expected a JSON object of arrays"),
        ("T", None, None, 1, "a TRUNCATE is never packed"),
        ("I", None, '{"id": []}', 0, "rows is 0, expected 1 to"),
        ("X", None, '{"id": ["1"]}', 1, "unknown operation 'X'"),
        ("I", None, f'{{"id": [{HUGE}]}}', 1, "new_row cannot be parsed"),
    ],
)
def test_a_malformed_pack_is_one_dead_letter_and_the_rows_around_it_decode(
    op: str, old: str | None, new: str | None, rows: int, reason: str
) -> None:
    decoded = RowDecoder().queue_rows(
        [
            (1, "public", "users", "I", None, '{"id": "1"}', None),
            (2, "public", "users", op, old, new, rows),
            (3, "public", "users", "I", None, '{"id": ["3"]}', 1),
        ],
        count_at=6,
    )
    assert [e.new for e in decoded.events] == [{"id": "1"}, {"id": "3"}]
    [(position, why)] = decoded.dead
    assert position == 2
    assert reason in why


def test_rows_are_sliced_by_their_events_for_decoding() -> None:
    rows = [(1, None), (2, 1000), (3, None), (4, None), (5, 998), (6, 0)]
    slices = [[r[0] for r in part] for part in by_events(rows, 1, 1000)]
    assert slices == [[1, 2], [3, 4, 5], [6]]


def test_a_sql_ascii_databases_byte_leaves_its_value_out_of_the_row() -> None:
    """Raw text (pg/raw_text.py) carries a byte that is not UTF-8 as a lone surrogate: no
    key can be made of such a value, so its row lacks the column (the mapper sweeps the
    templates that use it, and deletes the others' keys), in a pack too, element by
    element. Nothing is a dead letter; valid UTF-8 is kept."""
    pack = '{"id": ["4", "5", "6"], "email": ["d@x", "caf\udce9", "é@x"]}'
    decoded = RowDecoder(raw=True).queue_rows(
        [
            (7, "public", "users", "I", None, '{"id": "1", "email": "caf\udce9"}', None),
            (8, "public", "users", "I", None, '{"id": "2", "email": "é@x"}', None),
            (9, "public", "users", "I", None, pack, 3),
        ],
        count_at=6,
    )
    assert decoded.dead == []
    assert [(e.position, e.new) for e in decoded.events] == [
        (7, {"id": "1"}),
        (8, {"id": "2", "email": "é@x"}),
        (pack_position(9, 0), {"id": "4", "email": "d@x"}),
        (pack_position(9, 1), {"id": "5"}),
        (pack_position(9, 2), {"id": "6", "email": "é@x"}),
    ]
