"""The pgoutput Decoder on messages recorded from a real PostgreSQL (no servers here).

tests/data/pgoutput.json holds, per scenario, the messages a pgoutput slot gave for it,
in order (Relation messages first, as sent); tests/data/record_pgoutput.py wrote it.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Sequence

import pytest

from cdc_invalidator.capture import pgoutput
from cdc_invalidator.capture.pgoutput import (
    NATIVE_WALKS,
    Begin,
    Commit,
    Decoder,
    ProtocolError,
    Relation,
    Resolved,
    Stream,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    by_name,
    unwrap_streamed,
)
from cdc_invalidator.events import ChangeEvent, InvalidEvent, Op, TableName
from cdc_invalidator.events import StandInKind as Kind
from cdc_invalidator.mapping.columns import ColumnFilter, Judge
from tests.support.evidence import unavailable
from tests.support.pgoutput_wire import (
    CHANGE_SCENARIOS,
    HAND,
    HAND_RELID,
    SCENARIOS,
    TOAST_SLUG,
    ColumnsFor,
    columns,
    hand_change,
    hand_relation,
    streamed_layout,
    text_field,
    tuple_data,
)

USERS = TableName("public", "users")
USERS_FULL = TableName("public", "users_full")
PAGES = TableName("public", "pages")
PAGES_FULL = TableName("public", "pages_full")
MEASUREMENTS = TableName("public", "measurements")
ORDERS = TableName.parse('"My Schema"."Order""s"')

Result = Begin | Commit | ChangeEvent | list[ChangeEvent] | Stream | None
MissingCalls = list[tuple[TableName, list[str]]]

ANN = {"id": "1", "email": "ann@example.com", "name": "Ann"}
ANNA = {"id": "1", "email": "ann@example.com", "name": "Anna"}
ANNA_ORG = {"id": "1", "email": "ann@example.org", "name": "Anna"}
ANNA_ORG_10 = {"id": "10", "email": "ann@example.org", "name": "Anna"}


def all_columns(_table: TableName) -> None:
    return None


# Every column except the TOASTed slug that toast_default cannot give.
SAFE = columns({PAGES: ["id", "title"]})


def feed(decoder: Decoder, *names: str) -> list[Result]:
    return [decoder.decode(msg) for name in names for msg in SCENARIOS[name]]


def events_of(results: list[Result]) -> list[ChangeEvent]:
    out: list[ChangeEvent] = []
    for r in results:
        if isinstance(r, list):
            out.extend(r)
        elif isinstance(r, ChangeEvent):
            out.append(r)
    return out


def events(name: str, columns_for: ColumnsFor = all_columns) -> list[ChangeEvent]:
    return events_of(feed(Decoder(by_name(columns_for)), name))


def recorder() -> tuple[MissingCalls, Callable[[Relation, list[str]], None]]:
    calls: MissingCalls = []

    def on_missing_old(relation: Relation, missing: list[str]) -> None:
        calls.append((relation.table, missing))

    return calls, on_missing_old


def message(name: str, kind: str, nth: int = 0) -> bytes:
    """The nth message of a kind ('I', 'U', ...) in a scenario."""
    found = [m for m in SCENARIOS[name] if m[:1] == kind.encode()]
    return found[nth]


def replace_value(msg: bytes, old: bytes, new: bytes) -> bytes:
    """The message with one text value replaced, its length field to match."""
    assert msg.count(text_field(old)) == 1
    return msg.replace(text_field(old), text_field(new))


# --- framing --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_transactions_are_framed_by_begin_and_commit(name: str) -> None:
    results = feed(Decoder(by_name(SAFE)), name)
    begins = [r for r in results if isinstance(r, Begin)]
    commits = [r for r in results if isinstance(r, Commit)]
    assert isinstance(results[0], Begin)
    assert isinstance(results[-1], Commit)
    assert len(begins) == len(commits) >= 1
    for begin, commit in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert begin.commit_time == commit.commit_time > 0
        assert begin.xid > 0
    assert [b.xid for b in begins] == sorted({b.xid for b in begins})
    assert [c.commit_lsn for c in commits] == sorted({c.commit_lsn for c in commits})


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_position_counts_events_one_by_one(name: str) -> None:
    decoder = Decoder(by_name(SAFE))
    seen: list[int] = []
    for msg in SCENARIOS[name]:
        result = decoder.decode(msg)
        if msg[:1] in b"IUD":
            assert isinstance(result, ChangeEvent)
            seen.append(result.position)
        elif msg[:1] == b"T":
            assert isinstance(result, list)
            seen += [e.position for e in result]
        else:
            assert not isinstance(result, ChangeEvent | list)
        assert decoder.position == len(seen)
    assert seen == list(range(1, len(seen) + 1))


def test_position_goes_on_across_transactions_and_relations() -> None:
    got = events_of(feed(Decoder(by_name(all_columns)), "insert", "truncate_two", "quoted"))
    assert [e.position for e in got] == [1, 2, 3, 4, 5, 6]
    assert [e.table for e in got] == [USERS, USERS, USERS, USERS_FULL, ORDERS, ORDERS]


# --- rows ------------------------------------------------------------------------------


def test_insert_gives_every_column_as_text_and_null_as_none() -> None:
    assert events("insert") == [
        ChangeEvent(USERS, Op.INSERT, None, ANN, 1),
        ChangeEvent(USERS, Op.INSERT, None, {"id": "2", "email": None, "name": "Bob"}, 2),
    ]


def test_only_the_wanted_columns_are_decoded() -> None:
    got = events("insert", columns({USERS: ["email", "id"]}))
    assert [e.new for e in got] == [
        {"email": "ann@example.com", "id": "1"},
        {"email": None, "id": "2"},
    ]


def test_a_key_column_the_table_lacks_makes_each_change_a_sweep_told_once() -> None:
    told: list[tuple[TableName, tuple[str, ...]]] = []
    decoder = Decoder(
        by_name(columns({USERS: ["id", "nickname"]})),
        on_unrenderable=lambda r: told.append((r.table, r.missing)),
    )
    got = events_of(feed(decoder, "insert"))
    # Its keys cannot be rendered: a sweep of the table's templates, as for TRUNCATE.
    reason = {
        Kind.UNRENDERABLE: "key columns nickname of public.users are not in it (dropped since, "
        "or generated columns, which PostgreSQL sends from version 18 on), or are of a type "
        "dropped since, or of a type cast to text by a function of its own (CREATE CAST ... "
        "WITH FUNCTION), whose `::text` logical mode cannot render"
    }
    assert [(e.table, e.op, e.old, e.new) for e in got] == [(USERS, Op.TRUNCATE, None, reason)] * 2
    assert [e.position for e in got] == [1, 2]
    assert told == [(USERS, ("nickname",))], "once per Relation message, not per row"
    relation = next(iter(decoder.relations.values()))
    assert relation.wanted == (("id", 0),)


def test_a_relation_lacking_the_same_key_columns_again_is_not_told_again() -> None:
    """pgoutput sends a Relation message per streamed block of a transaction: a large
    one's dozens each warned (key_columns_missing), with the same columns."""
    told: list[tuple[str, ...]] = []
    decoder = Decoder(
        by_name(columns({USERS: ["id", "nickname"]})),
        on_unrenderable=lambda r: told.append(r.missing),
    )
    events_of(feed(decoder, "insert"))
    events_of(feed(decoder, "insert"))  # its Relation message again
    assert told == [("nickname",)]


def test_a_renamed_table_and_column_map_to_the_configured_names() -> None:
    """The resolver knows the relation by OID and the column by number: the message's
    names (members, mail) become the configured ones (users, email)."""
    relation = message("insert", "R")
    relid = struct.unpack_from("!I", relation, 1)[0]
    renamed = relation.replace(b"public\x00users\x00", b"public\x00members\x00").replace(
        b"email\x00", b"mail\x00"
    )
    seen: list[tuple[int, TableName, tuple[str, ...]]] = []

    def resolve(rel: int, table: TableName, cols: tuple[str, ...]) -> Resolved | None:
        seen.append((rel, table, cols))
        return (
            Resolved(USERS, ("email", "id"), {"email": "mail", "id": "id"})
            if rel == relid
            else None
        )

    decoder = Decoder(resolve)
    assert decoder.decode(renamed) is None
    assert decoder.decode(message("insert", "I")) == ChangeEvent(
        USERS, Op.INSERT, None, {"email": "ann@example.com", "id": "1"}, 1
    )
    assert seen == [(relid, TableName("public", "members"), ("id", "mail", "name"))]


def test_an_unknown_relation_keeps_its_name_and_no_values() -> None:
    decoder = Decoder(lambda _relid, _table, _cols: None)
    got = events_of(feed(decoder, "insert"))
    assert [(e.table, e.op, e.new) for e in got] == [(USERS, Op.INSERT, {})] * 2


@pytest.mark.parametrize(
    ("name", "table", "identity", "identity_columns"),
    [
        ("default_update_name", USERS, "d", {"id"}),
        ("full_update_name", USERS_FULL, "f", {"id", "email", "name"}),
    ],
)
def test_relation_messages_are_remembered(
    name: str, table: TableName, identity: str, identity_columns: set[str]
) -> None:
    decoder = Decoder(by_name(all_columns))
    feed(decoder, name)
    (relation,) = decoder.relations.values()
    assert relation.table == table
    assert relation.identity == identity
    assert relation.columns == ("id", "email", "name")
    assert relation.identity_columns == identity_columns
    assert relation.wanted == (("id", 0), ("email", 1), ("name", 2))


@pytest.mark.parametrize(
    ("name", "op", "old", "new"),
    [
        # DEFAULT identity: no old tuple unless the key changed; then a 'K' tuple.
        ("default_update_name", Op.UPDATE, ANNA, ANNA),
        ("default_update_email", Op.UPDATE, ANNA_ORG, ANNA_ORG),
        # The K tuple's unsent columns are taken from the new tuple.
        ("default_update_pk", Op.UPDATE, ANNA_ORG, ANNA_ORG_10),
        # Unsent (not NULL: the row had an email) becomes None.
        ("default_delete", Op.DELETE, {"id": "10", "email": None, "name": None}, None),
        # FULL identity: an 'O' tuple with the whole old row.
        ("full_update_name", Op.UPDATE, ANN, ANNA),
        ("full_update_email", Op.UPDATE, ANNA, ANNA_ORG),
        ("full_update_pk", Op.UPDATE, ANNA_ORG, ANNA_ORG_10),
        ("full_delete", Op.DELETE, ANNA_ORG_10, None),
    ],
)
def test_update_and_delete_rows(
    name: str, op: Op, old: dict[str, str | None], new: dict[str, str] | None
) -> None:
    table = USERS_FULL if name.startswith("full") else USERS
    assert events(name) == [ChangeEvent(table, op, old, new, 1)]


@pytest.mark.parametrize("name", ["default_update_name", "default_update_email"])
def test_update_without_old_tuple_shares_one_row(name: str) -> None:
    (event,) = events(name, columns({USERS: ["id", "email"]}))
    assert event.old is event.new
    assert event.new is not None
    assert event.new["id"] == "1"


def test_full_update_of_an_unwanted_column_shares_one_row() -> None:
    (event,) = events("full_update_name", columns({USERS_FULL: ["id", "email"]}))
    assert event.new == {"id": "1", "email": "ann@example.com"}
    assert event.old is event.new


def test_full_primary_key_change_has_both_ids() -> None:
    (event,) = events("full_update_pk", columns({USERS_FULL: ["id"]}))
    assert (event.old, event.new) == ({"id": "1"}, {"id": "10"})


# --- old values that were not sent -----------------------------------------------------


def test_missing_old_values_are_told_once_per_relation() -> None:
    calls, on_missing_old = recorder()
    wanted = columns({USERS: ["id", "email"], ORDERS: ["Key Col", "Note"]})
    decoder = Decoder(by_name(wanted), on_missing_old)
    got = events_of(
        feed(
            decoder,
            "default_update_name",
            "default_update_email",
            "default_update_pk",
            "default_delete",
            "quoted",
        )
    )
    assert len(got) == 6
    assert calls == [(USERS, ["email"]), (ORDERS, ["Note"])]


@pytest.mark.parametrize(
    ("names", "wanted"),
    [
        # FULL identity sends whole old rows.
        (
            ["full_update_name", "full_update_email", "full_update_pk", "full_delete"],
            {USERS_FULL: ["id", "email"]},
        ),
        (["toast_full"], {PAGES_FULL: ["slug", "title"]}),
        # Only identity columns wanted: nothing is missing.
        (["default_update_name", "default_update_pk", "default_delete"], {USERS: ["id"]}),
        # Inserts have no old row.
        (["insert", "enum_type"], {}),
    ],
)
def test_missing_old_values_are_not_told_when_nothing_is_missing(
    names: list[str], wanted: dict[TableName, list[str]]
) -> None:
    calls, on_missing_old = recorder()
    decoder = Decoder(by_name(columns(wanted)), on_missing_old)
    assert events_of(feed(decoder, *names))
    assert calls == []


# --- TOAST -------------------------------------------------------------------------------


def test_recorded_toast_update_carries_the_unchanged_marker() -> None:
    """The data test below relies on: the value once (old tuple), 'u' in the new one."""
    msg = message("toast_full", "U")
    assert msg.count(TOAST_SLUG.encode()) == 1
    assert msg.endswith(b"N\x00\x03" + text_field(b"1") + b"u" + text_field(b"B"))
    assert message("toast_default", "U")[5:] == b"N\x00\x03" + text_field(b"1") + b"u" + (
        text_field(b"B")
    )


def test_unchanged_toast_value_is_taken_from_the_full_old_row() -> None:
    (event,) = events("toast_full")
    assert event.old is not None
    assert event.new is not None
    assert len(TOAST_SLUG) == 20000
    assert event.new["slug"] == TOAST_SLUG
    assert event.old["slug"] == TOAST_SLUG
    assert event.old == {"id": "1", "slug": TOAST_SLUG, "title": "A"}
    assert event.new == {"id": "1", "slug": TOAST_SLUG, "title": "B"}


def test_unchanged_toast_value_of_a_wanted_column_shares_one_row() -> None:
    (event,) = events("toast_full", columns({PAGES_FULL: ["slug"]}))
    assert event.new == {"slug": TOAST_SLUG}
    assert event.old is event.new


@pytest.mark.parametrize("wanted", [["slug"], ["id", "slug"], None])
def test_unchanged_toast_value_without_old_row_is_invalid(wanted: list[str] | None) -> None:
    decoder = Decoder(by_name(lambda _t: wanted))
    msgs = SCENARIOS["toast_default"]
    for msg in msgs[:2]:  # Begin, Relation
        decoder.decode(msg)
    with pytest.raises(InvalidEvent, match=r"'slug' of public\.pages .*REPLICA IDENTITY FULL"):
        decoder.decode(msgs[2])


def test_unchanged_toast_value_of_an_unwanted_column_is_no_problem() -> None:
    (event,) = events("toast_default", columns({PAGES: ["id", "title"]}))
    assert event == ChangeEvent(
        PAGES, Op.UPDATE, {"id": "1", "title": "B"}, {"id": "1", "title": "B"}, 1
    )
    assert event.old is event.new


# --- TRUNCATE, partitions, names, other messages -----------------------------------------


@pytest.mark.parametrize(
    ("name", "tables", "options"),
    [
        ("truncate_two", [USERS, USERS_FULL], 0),
        ("truncate_cascade", [TableName("public", "authors"), TableName("public", "books")], 1),
    ],
)
def test_truncate_gives_one_event_per_table(
    name: str, tables: list[TableName], options: int
) -> None:
    results = feed(Decoder(by_name(all_columns)), name)
    assert message(name, "T")[5] == options  # CASCADE is bit 1: recorded as meant
    (truncated,) = [r for r in results if isinstance(r, list)]
    assert truncated == [
        ChangeEvent(table, Op.TRUNCATE, None, None, i) for i, table in enumerate(tables, 1)
    ]


def test_partition_changes_name_the_root() -> None:
    eu1 = {"region": "eu", "id": "1", "v": "x"}
    us2 = {"region": "us", "id": "2", "v": "y"}
    us2z = {"region": "us", "id": "2", "v": "z"}
    assert events("partition") == [
        ChangeEvent(MEASUREMENTS, Op.INSERT, None, eu1, 1),
        ChangeEvent(MEASUREMENTS, Op.INSERT, None, us2, 2),
        ChangeEvent(MEASUREMENTS, Op.UPDATE, us2z, us2z, 3),
        # Moving to another partition: DELETE (a 'K' tuple) and INSERT.
        ChangeEvent(MEASUREMENTS, Op.DELETE, {"region": "eu", "id": "1", "v": None}, None, 4),
        ChangeEvent(MEASUREMENTS, Op.INSERT, None, {"region": "us", "id": "1", "v": "x"}, 5),
    ]


def as_partition(msg: bytes) -> bytes:
    """The users Relation message as if it described a partition, users_p1."""
    assert msg.count(b"public\x00users\x00") == 1
    return msg.replace(b"public\x00users\x00", b"public\x00users_p1\x00")


def test_a_partition_published_under_its_own_name_maps_to_its_configured_ancestor() -> None:
    parent, top = TableName("public", "users_mid"), USERS
    asked: list[int] = []

    def ancestors_of(relid: int) -> list[TableName]:
        asked.append(relid)
        return [parent, top]  # nearest first; only the top one is configured

    decoder = Decoder(by_name(columns({USERS: ["id"]}), ancestors_of))
    relation = as_partition(message("insert", "R"))
    assert decoder.decode(relation) is None
    assert decoder.decode(message("insert", "I")) == ChangeEvent(
        USERS, Op.INSERT, None, {"id": "1"}, 1
    )
    assert asked == [struct.unpack_from("!I", relation, 1)[0]]


def test_a_table_no_configured_table_contains_keeps_its_name() -> None:
    decoder = Decoder(by_name(columns({ORDERS: ["Key Col"]}), lambda _relid: []))
    decoder.decode(as_partition(message("insert", "R")))
    event = decoder.decode(message("insert", "I"))
    assert isinstance(event, ChangeEvent)
    assert (event.table, event.new) == (TableName("public", "users_p1"), ANN)


def test_a_configured_table_is_not_looked_up() -> None:
    def ancestors_of(_relid: int) -> list[TableName]:
        raise AssertionError("looked up")

    decoder = Decoder(by_name(columns({USERS: ["id"]}), ancestors_of))
    feed(decoder, "insert")


def test_quoted_mixed_case_names() -> None:
    assert (ORDERS.schema, ORDERS.name) == ("My Schema", 'Order"s')
    assert events("quoted") == [
        ChangeEvent(ORDERS, Op.INSERT, None, {"Key Col": "7", "Note": "seven"}, 1),
        ChangeEvent(ORDERS, Op.DELETE, {"Key Col": "7", "Note": None}, None, 2),
    ]
    assert [e.new or e.old for e in events("quoted", columns({ORDERS: ["Key Col"]}))] == [
        {"Key Col": "7"},
        {"Key Col": "7"},
    ]


def test_user_defined_type_column() -> None:
    results = feed(Decoder(by_name(all_columns)), "enum_type")
    assert [m[:1] for m in SCENARIOS["enum_type"]] == [b"B", b"Y", b"R", b"I", b"C"]
    assert results[1] is None
    assert results[3] == ChangeEvent(
        TableName("public", "moods"), Op.INSERT, None, {"id": "1", "m": "happy"}, 1
    )


# Built per "Logical Replication Message Formats" (protocol 1: no xid fields).
TYPE_MSG = b"Y" + struct.pack("!I", 16459) + b"public\x00mood\x00"
ORIGIN_MSG = b"O" + struct.pack("!Q", 0x12345678) + b"upstream\x00"


def test_hand_built_messages_match_the_recorded_ones() -> None:
    recorded_type = message("enum_type", "Y")
    assert recorded_type == b"Y" + recorded_type[1:5] + b"public\x00mood\x00"
    assert message("origin", "O") == ORIGIN_MSG


@pytest.mark.parametrize(
    "msg",
    [
        TYPE_MSG,
        ORIGIN_MSG,
        message("enum_type", "Y"),
        message("origin", "O"),
        message("message", "M"),
    ],
    ids=["type", "origin", "recorded-type", "recorded-origin", "recorded-message"],
)
def test_messages_without_changes_give_none(msg: bytes) -> None:
    decoder = Decoder(by_name(all_columns))
    feed(decoder, "insert")
    assert decoder.decode(msg) is None
    assert decoder.position == 2
    assert [r.table for r in decoder.relations.values()] == [USERS]


def test_origin_transaction_decodes_like_any_other() -> None:
    results = feed(Decoder(by_name(all_columns)), "origin")
    assert results[1] is None
    assert events_of(results) == [
        ChangeEvent(USERS, Op.INSERT, None, {"id": "3", "email": "c@example.com", "name": "Cy"}, 1)
    ]


# --- invalid events ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [b"\xff", b"An\xffn", b"\xc3\x28", b"\xed\xa0\x80", b"Ann\xe2\x82"],
    ids=["ff", "ff-inside", "bad-continuation", "surrogate", "cut-sequence"],
)
def test_a_value_that_is_not_utf8_is_left_out_of_its_row(bad: bytes) -> None:
    """A SQL_ASCII database's bytes: no key can be made of them (which one the application
    made depends on its client encoding), so the row lacks the column, and the mapper
    sweeps the templates that use it and deletes the others' keys."""
    first, second = replace_value(message("insert", "I"), b"Ann", bad), message("insert", "I", 1)
    decoder = Decoder(by_name(all_columns))
    decoder.decode(message("insert", "R"))
    assert decoder.decode(first) == ChangeEvent(
        USERS, Op.INSERT, None, {"id": "1", "email": "ann@example.com"}, 1
    )
    assert decoder.decode(second) == ChangeEvent(
        USERS, Op.INSERT, None, {"id": "2", "email": None, "name": "Bob"}, 2
    )


@pytest.mark.parametrize(
    ("name", "kind", "op"),
    [
        ("insert", "I", Op.INSERT),
        ("full_update_name", "U", Op.UPDATE),
        ("full_delete", "D", Op.DELETE),
    ],
)
def test_a_value_not_utf8_is_left_out_of_each_kind_of_change(name: str, kind: str, op: Op) -> None:
    msg = message(name, kind)
    good = next(v for v in (b"Ann", b"Anna") if msg.count(text_field(v)) == 1)
    decoder = Decoder(by_name(all_columns))
    decoder.decode(message(name, "R"))
    event = decoder.decode(replace_value(msg, good, b"A\xffn"))
    assert isinstance(event, ChangeEvent)
    assert (event.table.name, event.op) == (message_table(name), op)
    row = event.new if op is Op.INSERT else event.old  # the tuple with "Ann" in it
    assert row is not None
    assert "name" not in row
    assert row["id"] in ("1", "10")


def message_table(name: str) -> str:
    return "users_full" if name.startswith("full") else "users"


def test_a_value_that_is_not_utf8_in_an_unwanted_column_is_not_decoded() -> None:
    decoder = Decoder(by_name(columns({USERS: ["id", "email"]})))
    decoder.decode(message("insert", "R"))
    event = decoder.decode(replace_value(message("insert", "I"), b"Ann", b"\xff\xfe"))
    assert event == ChangeEvent(USERS, Op.INSERT, None, {"id": "1", "email": "ann@example.com"}, 1)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("insert", "I"), ("default_update_pk", "U"), ("full_delete", "D"), ("truncate_two", "T")],
)
def test_a_change_to_an_undescribed_relation_is_invalid(name: str, kind: str) -> None:
    decoder = Decoder(by_name(all_columns))
    with pytest.raises(InvalidEvent, match=r"relation \d+, which was never described"):
        decoder.decode(message(name, kind))
    assert decoder.position == 0


# --- protocol errors -------------------------------------------------------------------------


def test_empty_message_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="empty message"):
        Decoder(by_name(all_columns)).decode(b"")


@pytest.mark.parametrize(
    "msg",
    [b"Z", b"Zzz", b"\x00", b"P\x00\x00\x00\x01\x01", b"X" + message("insert", "I")[1:]],
    ids=["Z", "Zzz", "nul", "prepare", "retyped-insert"],
)
def test_unknown_message_type_is_a_protocol_error(msg: bytes) -> None:
    decoder = Decoder(by_name(all_columns))
    decoder.decode(message("insert", "R"))
    with pytest.raises(
        ProtocolError, match=re.escape(f"unknown pgoutput message type {chr(msg[0])!r}")
    ):
        decoder.decode(msg)


CUT = [
    ("insert", "B"),
    ("insert", "R"),
    ("insert", "I"),
    ("default_update_pk", "U"),
    ("full_update_email", "U"),
    ("default_delete", "D"),
    ("full_delete", "D"),
    ("truncate_two", "T"),
    ("insert", "C"),
]


@pytest.mark.parametrize(("name", "kind"), CUT, ids=[f"{n}-{k}" for n, k in CUT])
def test_a_truncated_message_is_a_protocol_error(name: str, kind: str) -> None:
    whole = message(name, kind)
    accepted: list[tuple[int, Result]] = []
    errors: set[str] = set()
    for length in range(1, len(whole)):
        decoder = Decoder(by_name(all_columns))
        for rel in (m for m in SCENARIOS[name] if m[:1] == b"R"):
            decoder.decode(rel)
        try:
            accepted.append((length, decoder.decode(whole[:length])))
        except ProtocolError as exc:
            errors.add(str(exc).split(":")[0])
    assert errors == {f"malformed {kind!r} message"}
    # Cut inside a value, the value comes out short: text that was never in the row.
    assert not accepted, (
        f"the {len(whole)}-byte {kind!r} message cut to {[n for n, _ in accepted]} bytes "
        f"decoded without error, e.g. to {accepted[-1][1]!r}"
    )


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        # 'b' (binary) is only sent when the subscriber asks for it.
        (lambda m: m.replace(text_field(b"1"), b"b" + text_field(b"1")[1:]), "column kind 'b'"),
        # A tuple of 4 columns for a relation of 3.
        (lambda m: m[:6] + b"\x00\x04" + m[8:] + b"n", "tuple has 4 columns, its relation 3"),
    ],
    ids=["binary-column", "column-count"],
)
def test_a_malformed_tuple_is_a_protocol_error(edit: Callable[[bytes], bytes], error: str) -> None:
    decoder = Decoder(by_name(all_columns))
    decoder.decode(message("insert", "R"))
    with pytest.raises(ProtocolError, match=error):
        decoder.decode(edit(message("insert", "I")))


@pytest.mark.parametrize(
    ("name", "kind", "tag", "error"),
    [
        ("insert", "I", b"X", "INSERT without a new tuple (got 'X')"),
        ("default_update_name", "U", b"X", "UPDATE without a new tuple (got 'X')"),
        ("default_delete", "D", b"N", "DELETE without an old tuple (got 'N')"),
    ],
)
def test_a_missing_tuple_is_a_protocol_error(name: str, kind: str, tag: bytes, error: str) -> None:
    decoder = Decoder(by_name(all_columns))
    decoder.decode(message(name, "R"))
    msg = message(name, kind)
    with pytest.raises(ProtocolError, match=re.escape(error)):
        decoder.decode(msg[:5] + tag + msg[6:])


# --- column filters ------------------------------------------------------------------------


def judged(
    name: str, table: TableName, column_filter: ColumnFilter, wanted: Sequence[str]
) -> list[ChangeEvent]:
    decoder = Decoder(by_name(columns({table: wanted}), filters={table: column_filter}))
    return events_of(feed(decoder, name))


@pytest.mark.parametrize(
    ("name", "table", "column_filter", "kept"),
    [
        # full_update_name changes name only: ignored, or not listed.
        ("full_update_name", USERS_FULL, ColumnFilter(Judge.IGNORE, ("name",), ("id",)), False),
        ("full_update_name", USERS_FULL, ColumnFilter(Judge.COLUMNS, ("email",), ("id",)), False),
        ("full_update_name", USERS_FULL, ColumnFilter(Judge.IGNORE, (), ("id",)), True),
        ("full_update_name", USERS_FULL, ColumnFilter(Judge.COLUMNS, ("name",), ("id",)), True),
        # A template column counts even when ignored.
        ("full_update_email", USERS_FULL, ColumnFilter(Judge.IGNORE, ("email",), ("email",)), True),
        ("full_update_pk", USERS_FULL, ColumnFilter(Judge.COLUMNS, (), ("id",)), True),
        # toast_full: title A -> B, the TOASTed slug sent as 'u' (unchanged) in the new row.
        ("toast_full", PAGES_FULL, ColumnFilter(Judge.IGNORE, ("title",), ("id",)), False),
        ("toast_full", PAGES_FULL, ColumnFilter(Judge.COLUMNS, ("slug",), ("id",)), False),
        ("toast_full", PAGES_FULL, ColumnFilter(Judge.IGNORE, (), ("id",)), True),
        # No whole old row (default identity): nothing to judge by, the change is an event.
        ("default_update_name", USERS, ColumnFilter(Judge.IGNORE, ("name",), ("id",)), True),
        # A listed column the table does not have (renamed, dropped): not judged.
        ("full_update_name", USERS_FULL, ColumnFilter(Judge.COLUMNS, ("nick",), ("id",)), True),
    ],
)
def test_a_column_filter_drops_updates_of_uncounted_columns(
    name: str, table: TableName, column_filter: ColumnFilter, kept: bool
) -> None:
    got = judged(name, table, column_filter, ["id"])
    assert [e.op for e in got] == ([Op.UPDATE] if kept else [])


def test_a_column_filter_leaves_inserts_and_deletes_alone() -> None:
    column_filter = ColumnFilter(Judge.COLUMNS, (), ("id",))
    assert {e.op for e in judged("insert", USERS, column_filter, ["id"])} == {Op.INSERT}
    assert {e.op for e in judged("full_delete", USERS_FULL, column_filter, ["id"])} == {Op.DELETE}


# --- protocol 2: streamed transactions (layouts from the docs' "Logical Replication
# Message Formats"; the live tests exercise them against servers) ---------------------


def test_stream_messages_decode_as_the_docs_lay_them_out() -> None:
    decoder = Decoder(by_name(all_columns))
    assert decoder.decode(b"S" + struct.pack("!IB", 700, 1)) == StreamStart(700, True)
    assert decoder.decode(b"S" + struct.pack("!IB", 700, 0)) == StreamStart(700, False)
    assert decoder.decode(b"E") == StreamStop()
    commit = b"c" + struct.pack("!IBQQq", 700, 0, 0x1_0000_0010, 0x1_0000_0040, 123)
    assert decoder.decode(commit) == StreamCommit(700, 0x1_0000_0010, 0x1_0000_0040, 123)
    assert decoder.decode(b"A" + struct.pack("!II", 700, 701)) == StreamAbort(700, 701)
    with pytest.raises(ProtocolError, match="malformed 'c' message"):
        decoder.decode(commit[:-1])


def test_a_streamed_change_carries_its_subtransaction_xid_after_its_type() -> None:
    """Inside a block a change has the (sub)transaction's xid after its type byte; what
    follows is protocol 1's layout, decoded the same way."""
    plain = [m for m in SCENARIOS["default_update_email"] + SCENARIOS["insert"] if m[:1] in b"RIUD"]
    assert plain, "the recorded scenario has a relation and changes"
    for msg in plain:
        xid, body = unwrap_streamed(msg[:1] + struct.pack("!I", 701) + msg[1:])
        assert (xid, body) == (701, msg)
    # An Origin (sent after a first Stream Start) and Stream Stop carry no xid.
    assert unwrap_streamed(b"E") == (0, b"E")
    origin = b"O" + struct.pack("!Q", 5) + b"node\0"
    assert unwrap_streamed(origin) == (0, origin)
    with pytest.raises(ProtocolError, match="without an xid"):
        unwrap_streamed(b"I\0\0")


def logical_message(prefix: str, content: bytes, *, transactional: bool = True) -> bytes:
    """A pgoutput Message ('M') as protocol 1 lays it out."""
    return (
        b"M"
        + struct.pack("!BQ", 1 if transactional else 0, 0x1_0000_0020)
        + prefix.encode()
        + b"\0"
        + struct.pack("!I", len(content))
        + content
    )


def test_our_logical_message_is_a_sweep_of_the_table_it_names() -> None:
    """The rebuild guard's sweeps come as transactional messages of our prefix
    (sql/rebuild_guard.sql); any other message is somebody else's."""
    decoder = Decoder(by_name(all_columns))
    body = {"schema": "My Schema", "table": 'Order"s', "reason": "table x was dropped"}
    ours = logical_message(pgoutput.MESSAGE_PREFIX, json.dumps(body).encode())
    event = decoder.decode(ours)
    assert event == ChangeEvent(ORDERS, Op.TRUNCATE, None, {"unrenderable": body["reason"]}, 1)
    # Streamed: the same after the transaction's xid.
    assert decoder.decode_streamed(ours[:1] + struct.pack("!I", 701) + ours[1:])[0] == 701
    for other in (
        logical_message("another_app", json.dumps(body).encode()),
        logical_message(pgoutput.MESSAGE_PREFIX, json.dumps(body).encode(), transactional=False),
    ):
        assert decoder.decode(other) is None
    # Any role may emit a message of our prefix (pg_logical_emit_message is PUBLIC's):
    # what cannot be read is a dead letter, never a crash at every start (a deep nesting
    # raised RecursionError; a name PostgreSQL text cannot hold failed the dead letter's
    # INSERT).
    names = b'{"schema": "%s", "table": "t", "reason": "r"}'
    for bad in (b'{"schema": "public"}', b"[" * 200_000, names % b"\\udc00", names % b"a\\u0000"):
        with pytest.raises(InvalidEvent, match="cdc_invalidator_v1"):
            decoder.decode(logical_message(pgoutput.MESSAGE_PREFIX, bad))
    with pytest.raises(ProtocolError, match="malformed 'M' message"):
        decoder.decode(ours[:5])


# --- the compiled tuple walk ----------------------------------------------------------------


def decode_all(decoder: Decoder, msgs: list[bytes]) -> list[object]:
    """Each message's result, or the error it raised (type and text)."""
    out: list[object] = []
    for msg in msgs:
        try:
            out.append(decoder.decode(msg))
        except InvalidEvent as exc:
            out.append((type(exc), str(exc), getattr(exc, "event", None)))
    return out


@pytest.mark.parametrize("name", CHANGE_SCENARIOS)
@pytest.mark.parametrize("wanted", ["all", "first", "last"])
def test_the_compiled_walk_decodes_every_recorded_change_as_the_general_walk(
    name: str, wanted: str
) -> None:
    def columns_for(_table: TableName) -> Sequence[str] | None:
        return None  # every column

    def pick(table: TableName, cols: tuple[str, ...]) -> Sequence[str]:
        return {"all": cols, "first": cols[:1], "last": cols[-1:]}[wanted]

    def resolve(relid: int, table: TableName, cols: tuple[str, ...]) -> Resolved:
        chosen = tuple(pick(table, cols))
        return Resolved(table, chosen, {c: c for c in chosen})

    msgs = SCENARIOS[name]
    general = Decoder(resolve, compiled=False)
    expected = decode_all(general, msgs)
    for native in (True, False):  # the C walks, and the Python ones
        compiled = Decoder(resolve, native=native)
        assert decode_all(compiled, msgs) == expected
        assert compiled.position == general.position


def hand_decoders(wanted: list[str]) -> list[Decoder]:
    """The C walks, the Python ones, and the general walk alone."""
    out = []
    for compiled, native in ((True, True), (True, False), (False, False)):
        decoder = Decoder(by_name(columns({HAND: wanted})), compiled=compiled, native=native)
        decoder.decode(hand_relation())
        out.append(decoder)
    return out


# A table whose key columns print otherwise as `::text`: boolean, character(5), inet, a
# domain over boolean (a type OID past the built-in ones), and an int.
CASTS_RELID = 40002
CASTS = TableName("public", "hosts")
CASTS_TYPES = ((b"up", 16), (b"code", 1042), (b"ip", 869), (b"ok", 70000), (b"id", 23))


def test_values_whose_text_cast_differs_are_cast_by_every_walk() -> None:
    cols = b"".join(b"\x01" + n + b"\x00" + struct.pack("!Ii", oid, -1) for n, oid in CASTS_TYPES)
    relation = b"R" + struct.pack("!I", CASTS_RELID) + b"public\x00hosts\x00f\x00\x05" + cols

    def change(kind: bytes, *tuples: tuple[bytes, bytes]) -> bytes:
        return kind + struct.pack("!I", CASTS_RELID) + b"".join(t + d for t, d in tuples)

    one = tuple_data(b"f", b"ab   ", b"10.0.0.1", b"t", b"1")
    two = tuple_data(b"t", b"ab   ", b"::1", b"f", b"1")
    masked = tuple_data(b"t", b"abcde", b"10.0.0.0/8", None, b"2")
    msgs = [
        change(b"I", (b"N", one)),
        change(b"U", (b"O", one), (b"N", two)),
        change(b"U", (b"O", two), (b"N", two)),
        change(b"D", (b"O", masked)),
    ]
    cast_one = {"up": "false", "code": "ab", "ip": "10.0.0.1/32", "ok": "true", "id": "1"}
    cast_two = {"up": "true", "code": "ab", "ip": "::1/128", "ok": "false", "id": "1"}
    cast_masked = {"up": "true", "code": "abcde", "ip": "10.0.0.0/8", "ok": None, "id": "2"}
    expected = [
        ChangeEvent(CASTS, Op.INSERT, None, cast_one, 1),
        ChangeEvent(CASTS, Op.UPDATE, cast_one, cast_two, 2),
        ChangeEvent(CASTS, Op.UPDATE, cast_two, cast_two, 3),
        ChangeEvent(CASTS, Op.DELETE, cast_masked, None, 4),
    ]
    wanted = columns({CASTS: [n.decode() for n, _ in CASTS_TYPES]})
    for compiled, native in ((True, True), (True, False), (False, False)):
        decoder = Decoder(
            by_name(wanted),
            base_types=lambda types: dict.fromkeys(types & {70000}, 16),
            compiled=compiled,
            native=native,
        )
        assert decoder.decode(relation) is None
        assert [decoder.decode(m) for m in msgs] == expected, (compiled, native)


def test_a_key_column_of_a_type_dropped_since_is_swept_not_guessed() -> None:
    """A change decoded after its column's domain was dropped (retyped first): whether
    that domain was over a type cast otherwise is not known. Swept, not rendered."""
    cols = b"".join(b"\x01" + n + b"\x00" + struct.pack("!Ii", oid, -1) for n, oid in CASTS_TYPES)
    relation = b"R" + struct.pack("!I", CASTS_RELID) + b"public\x00hosts\x00f\x00\x05" + cols
    insert = b"I" + struct.pack("!I", CASTS_RELID) + b"N"
    insert += tuple_data(b"f", b"ab   ", b"10.0.0.1", b"t", b"1")
    wanted = columns({CASTS: [n.decode() for n, _ in CASTS_TYPES]})
    decoder = Decoder(by_name(wanted), base_types=lambda _types: {})
    decoder.decode(relation)
    event = decoder.decode(insert)
    assert isinstance(event, ChangeEvent)
    assert event.op is Op.TRUNCATE
    assert "key columns ok of public.hosts" in str(event.new)
    assert "of a type dropped since" in str(event.new)


@pytest.mark.parametrize(
    ("msg", "wanted", "expected"),
    [
        pytest.param(
            hand_change(b"I", (b"N", tuple_data(b"Ann", b"7", b"x"))),
            ["id"],
            ChangeEvent(HAND, Op.INSERT, None, {"id": "7"}, 1),
            id="insert-key-not-first",
        ),
        pytest.param(
            hand_change(b"I", (b"N", tuple_data(None, b"7", None))),
            ["id", "name"],
            ChangeEvent(HAND, Op.INSERT, None, {"name": None, "id": "7"}, 1),
            id="insert-null",
        ),
        pytest.param(
            hand_change(
                b"U", (b"O", tuple_data(b"Ann", b"7", b"x")), (b"N", tuple_data(b"Bo", b"7", "u"))
            ),
            ["id", "name"],
            ChangeEvent(HAND, Op.UPDATE, {"name": "Ann", "id": "7"}, {"name": "Bo", "id": "7"}, 1),
            id="update-unwanted-toast-unchanged",
        ),
        pytest.param(
            hand_change(
                b"U", (b"O", tuple_data(b"Ann", b"7", b"x")), (b"N", tuple_data(b"Ann", b"7", "u"))
            ),
            ["id", "body"],
            ChangeEvent(HAND, Op.UPDATE, {"id": "7", "body": "x"}, {"id": "7", "body": "x"}, 1),
            id="update-wanted-toast-unchanged",
        ),
        pytest.param(
            hand_change(
                b"U", (b"O", tuple_data(b"Ann", b"7", b"x")), (b"N", tuple_data(None, b"8", b"x"))
            ),
            ["name", "id"],
            ChangeEvent(HAND, Op.UPDATE, {"name": "Ann", "id": "7"}, {"name": None, "id": "8"}, 1),
            id="update-to-null-and-new-key",
        ),
        pytest.param(
            hand_change(b"U", (b"N", tuple_data(b"Ann", b"7", b"x"))),
            ["id"],
            ChangeEvent(HAND, Op.UPDATE, {"id": "7"}, {"id": "7"}, 1),
            id="update-without-old-tuple",
        ),
        pytest.param(
            hand_change(b"D", (b"O", tuple_data(b"Ann", b"7", None))),
            ["body", "id"],
            ChangeEvent(HAND, Op.DELETE, {"id": "7", "body": None}, None, 1),
            id="delete-null",
        ),
    ],
)
def test_the_compiled_walk_on_hand_built_changes(
    msg: bytes, wanted: list[str], expected: ChangeEvent
) -> None:
    for decoder in hand_decoders(wanted):
        event = decoder.decode(msg)
        assert event == expected
        assert isinstance(event, ChangeEvent)
        # One row for both when the key columns kept their text.
        assert (event.old is event.new) == (expected.old == expected.new)
        if event.new is not None:  # the columns in the table's order, as history keeps them
            assert list(event.new) == [c for c in ("name", "id", "body") if c in wanted]


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        pytest.param(
            hand_change(b"U", (b"N", tuple_data(b"Ann", b"7", "u"))),
            r"'body' of public\.hand is an unchanged TOASTed value",
            id="toast-unchanged-without-old-row",
        ),
        pytest.param(
            hand_change(b"I", (b"N", tuple_data(b"Ann", b"7"))),
            r"tuple has 2 columns, its relation 3",
            id="column-count",
        ),
        pytest.param(
            hand_change(b"I", (b"N", tuple_data(b"Ann", b"7", b"x")))[:-1],
            r"message ends inside a column value",
            id="cut-short",
        ),
        pytest.param(
            hand_change(b"I", (b"N", tuple_data(b"Ann", b"7", b"x"))) + b"\x00",
            r"1 bytes after the tuple data",
            id="trailing-bytes",
        ),
    ],
)
def test_what_the_compiled_walk_does_not_take_fails_as_before(msg: bytes, error: str) -> None:
    # A bad value is one bad event; bytes that do not parse, a broken stream.
    kind = InvalidEvent if "TOAST" in error else ProtocolError
    for decoder in hand_decoders(["id", "body"]):
        with pytest.raises(kind, match=error):
            decoder.decode(msg)


def test_the_c_walks_were_built_where_there_is_a_compiler() -> None:
    """capture/_walk.c is an optional extension (pyproject.toml): a machine without a C
    compiler installs without it. CI has one, so there a build that failed fails this."""
    if not NATIVE_WALKS:
        unavailable("capture/_walk.c was not built: no C compiler when the package was installed")


def _walk_result(walk: Callable[[bytes, int], object], msg: bytes, pos: int) -> object:
    """A compiled walk's result as its caller reads it: None for what it does not take
    (the Python walks raise for some of it, or end past the message)."""
    try:
        got = walk(msg, pos)
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    if not isinstance(got, tuple) or got[-1] > len(msg):
        return None
    return got


def test_the_c_walks_agree_with_the_python_walks_on_every_cut_and_flipped_byte() -> None:
    """Every recorded change and hand-built one, cut at every length and with each byte
    changed in turn: the C walks (capture/_walk.c) return what the Python walks do. (A
    read one byte past the end would not show here, since bytes objects end in a hidden
    NUL: the C was fuzzed on buffers of exact size under AddressSanitizer when written.)"""
    if not NATIVE_WALKS:
        unavailable("capture/_walk.c was not built")
    samples = [m for msgs in SCENARIOS.values() for m in msgs if m[:1] in (b"I", b"U", b"D")]
    samples += [
        hand_change(
            b"U", (b"O", tuple_data(b"Ann", b"7", b"x")), (b"N", tuple_data(b"Bo", b"7", "u"))
        ),
        hand_change(
            b"U", (b"O", tuple_data(None, b"7", b"x")), (b"N", tuple_data(None, b"8", None))
        ),
        hand_change(b"I", (b"N", tuple_data(b"\xc3\xa9t\xc3\xa9", b"7", b"x" * 300))),
    ]
    checked = 0
    for msg in samples:
        ncols = struct.unpack_from("!H", msg, 6)[0]
        for wanted in ({0: "a"}, {ncols - 1: "z"}, {i: f"c{i}" for i in range(ncols)}, {}):
            walks = pgoutput._walks(ncols, wanted, native=True)
            python = pgoutput._walks(ncols, wanted, native=False)
            variants = [msg[:n] for n in range(len(msg) + 1)]
            variants += [msg[:i] + bytes([msg[i] ^ 0xFF]) + msg[i + 1 :] for i in range(len(msg))]
            if len(msg) < 100:  # every field kind at every place, in the short ones
                kinds = b"tnub\x00"
                variants += [
                    msg[:i] + bytes([k]) + msg[i + 1 :] for i in range(6, len(msg)) for k in kinds
                ]
            for variant in variants:
                for c_walk, py_walk in zip(walks, python, strict=True):
                    c, py = _walk_result(c_walk, variant, 6), _walk_result(py_walk, variant, 6)
                    assert c == py, (variant.hex(), wanted)
                    if c is not None and py is not None:  # one dict for both, as in Python
                        assert isinstance(c, tuple)
                        assert isinstance(py, tuple)
                        assert (c[0] is c[1]) == (py[0] is py[1])
                    checked += 1
    assert checked > 5_000


def test_a_c_walker_refuses_what_it_cannot_walk_by() -> None:
    if not NATIVE_WALKS:
        unavailable("capture/_walk.c was not built")
    from cdc_invalidator.capture._walk import Walker  # noqa: PLC0415 - built or not

    with pytest.raises(ValueError, match="indexes ascending"):
        Walker(3, ((1, "b"), (0, "a")))
    with pytest.raises(ValueError, match="below ncols"):
        Walker(3, ((3, "d"),))
    with pytest.raises(TypeError, match="pairs"):
        Walker(3, ((0, b"a"),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="msg: bytes"):
        Walker(3, ())(bytearray(b"\x00\x03"), 0)  # type: ignore[arg-type]
    assert Walker(0, ())(b"\x00\x00", 0) == ({}, 2)
    assert Walker(1, ((0, "a"),))(b"\x00\x01t\x00\x00\x00\x01x", -5) is None


@pytest.mark.parametrize("name", CHANGE_SCENARIOS)
@pytest.mark.parametrize("compiled", [True, False])
def test_a_streamed_change_decodes_in_place_as_unwrapped(name: str, compiled: bool) -> None:
    in_place, unwrapped = (Decoder(by_name(SAFE), compiled=compiled) for _ in range(2))
    for n, msg in enumerate(SCENARIOS[name]):
        if msg[:1] not in (b"I", b"U", b"D", b"R"):
            continue  # (Begin and Commit are never inside a block)
        streamed = streamed_layout(msg, 700 + n)
        got = decode_all_streamed(in_place, [streamed])
        xid, body = unwrap_streamed(streamed)
        assert xid == 700 + n
        assert got == [(xid, r) for r in decode_all(unwrapped, [body])]


def decode_all_streamed(decoder: Decoder, msgs: list[bytes]) -> list[object]:
    out: list[object] = []
    for msg in msgs:
        try:
            out.append(decoder.decode_streamed(msg))
        except InvalidEvent as exc:
            out.append(
                (unwrap_streamed(msg)[0], (type(exc), str(exc), getattr(exc, "event", None)))
            )
    return out


@pytest.mark.parametrize(
    "msg",
    [
        hand_change(b"I", (b"N", tuple_data(b"Ann", b"7", b"x")))[:-1],
        hand_change(b"U", (b"O", tuple_data(b"Ann", b"7", b"x"))),
        hand_change(b"D", (b"N", tuple_data(b"Ann", b"7", b"x"))),
        hand_change(b"U", (b"X", tuple_data(b"Ann", b"7", b"x"))),
        b"U\x00\x00",
    ],
    ids=["cut-short", "update-no-new", "delete-no-old", "update-bad-tag", "no-relid"],
)
def test_a_malformed_streamed_change_fails_as_unwrapped(msg: bytes) -> None:
    """The same ProtocolError, naming the same fault, in place as unwrapped."""
    streamed = streamed_layout(msg, 700)
    decoders = [Decoder(by_name(columns({HAND: ["id"]}))) for _ in range(2)]
    for decoder in decoders:
        decoder.decode(hand_relation())
    with pytest.raises(ProtocolError) as in_place:
        decoders[0].decode_streamed(streamed)
    body = unwrap_streamed(streamed)[1]
    with pytest.raises(ProtocolError) as unwrapped:
        decoders[1].decode(body)
    errors = [str(in_place.value), str(unwrapped.value)]
    assert errors[0] == errors[1]
    assert errors[0].startswith("malformed ")


def test_a_streamed_change_of_an_undescribed_relation_is_invalid() -> None:
    decoder = Decoder(by_name(all_columns))
    msg = streamed_layout(hand_change(b"I", (b"N", tuple_data(b"Ann", b"7", b"x"))), 700)
    with pytest.raises(InvalidEvent, match=f"relation {HAND_RELID}, which was never described"):
        decoder.decode_streamed(msg)
