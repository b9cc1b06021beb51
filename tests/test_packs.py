"""Pure units: a streamed transaction's changes gathered column-wise (capture/packs.py,
Walker.collect in capture/_walk.c) against the Decoder's events for the same messages.

The end-to-end path (a bulk statement streamed, its keys deleted at its commit, its dead
letters, its history replayed) runs against real servers in test_bulk_logical and
test_replay; here each message, recorded or hand-built, cut and flipped byte by byte."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest

from cdc_invalidator.capture.packs import Collector, ColumnPack, map_packs
from cdc_invalidator.capture.pgoutput import (
    NATIVE_WALKS,
    Decoder,
    ProtocolError,
    Relation,
    Resolved,
    by_name,
)
from cdc_invalidator.capture.rows import RowDecoder, encode_history, with_transaction
from cdc_invalidator.events import ChangeEvent, InvalidEvent, Op, Pack, StandInKind, TableName
from cdc_invalidator.mapping.columns import ColumnFilter, Judge
from cdc_invalidator.mapping.mapper import Invalidation, Mapper
from cdc_invalidator.mapping.templates import KeyTemplate
from tests.support.evidence import unavailable
from tests.support.pgoutput_wire import (
    CHANGE_SCENARIOS,
    HAND,
    HAND_RELID,
    SCENARIOS,
    columns,
    hand_change,
    hand_relation,
    streamed_layout,
    tuple_data,
)

XID = 700


@pytest.fixture(autouse=True)
def _c_walks() -> None:
    if not NATIVE_WALKS:
        unavailable("capture/_walk.c was not built: packs are gathered by its walks only")


def picking(wanted: str) -> Callable[[int, TableName, tuple[str, ...]], Resolved]:
    def resolve(relid: int, table: TableName, cols: tuple[str, ...]) -> Resolved:
        chosen = {"all": cols, "first": cols[:1], "last": cols[-1:]}[wanted]
        return Resolved(table, tuple(chosen), {c: c for c in chosen})

    return resolve


class Twins:
    """Two decoders fed the same messages: one through a Collector first (what it does
    not take, through the decoder), the other through the decoder only. `streamed`: the
    changes in a stream block's layout (with an xid), else in a committed transaction's."""

    def __init__(self, make: Callable[[], Decoder], streamed: bool = True) -> None:
        self.told: list[list[tuple[TableName, list[str]]]] = [[], []]
        self.gathering = make()
        self.plain = make()
        self.gathering._on_missing_old = self._teller(0)
        self.plain._on_missing_old = self._teller(1)
        self.streamed = streamed
        self.collector = Collector(self.gathering, 10**6, streamed=streamed)
        self.collector.subxid = XID
        self.events: list[object] = []  # what the gathering side decoded itself
        self.expected: list[object] = []
        self.taken = 0

    def _teller(self, side: int) -> Callable[[Relation, list[str]], None]:
        def tell(relation: Relation, missing: list[str]) -> None:
            self.told[side].append((relation.table, missing))

        return tell

    def feed(self, msg: bytes, laid_out: bool = False) -> None:
        """A Relation message (protocol 1) to both, or a change (protocol 1's layout,
        moved into a stream block's if `streamed`, unless `laid_out` already)."""
        if msg[:1] == b"R":
            self.gathering.decode(msg)
            self.plain.decode(msg)
            return
        if self.streamed and not laid_out:
            msg = streamed_layout(msg, XID)
        position = self.gathering.position
        if self.collector.take(msg):
            self.taken += 1
            assert self.gathering.position == position + 1
        else:
            assert self.gathering.position == position
            self.events.append(_outcome(self.gathering, msg, self.streamed))
        self.expected.append(_outcome(self.plain, msg, self.streamed))

    def got(self) -> list[object]:
        """Every change's outcome in position order: the packs' events and the rest."""
        packs = self.collector.drain()
        for pack in packs:  # a change not taken left nothing behind in any column
            assert all(len(c) == len(pack) for c in (pack.old or ()) + (pack.new or ()))
        packed: list[object] = [e for p in packs for e in p.events()]
        decoded = [e for e in self.events if isinstance(e, ChangeEvent)]
        failed = [e for e in self.events if not isinstance(e, ChangeEvent)]
        ordered = sorted(packed + decoded, key=lambda e: e.position)  # type: ignore[attr-defined]
        return ordered + failed

    def want(self) -> list[object]:
        kept = [e for e in self.expected if isinstance(e, ChangeEvent)]
        return kept + [e for e in self.expected if not isinstance(e, ChangeEvent)]


def _outcome(decoder: Decoder, msg: bytes, streamed: bool) -> object:
    """What the decoder makes of a message: its event, or the error (type and text), or
    None (a message with no change)."""
    try:
        out = decoder.decode_streamed(msg)[1] if streamed else decoder.decode(msg)
    except (InvalidEvent, ProtocolError) as exc:
        return (type(exc).__name__, str(exc))
    return out if isinstance(out, ChangeEvent) else None


def _same_rows(got: list[object], want: list[object]) -> None:
    assert got == want
    for g, w in zip(got, want, strict=True):
        if isinstance(g, ChangeEvent) and isinstance(w, ChangeEvent):
            # One row for both where the decoder gives one (the mapper renders it once).
            assert (g.old is g.new) == (w.old is w.new), (g, w)


LAYOUTS = pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "committed"])


@LAYOUTS
@pytest.mark.parametrize("name", CHANGE_SCENARIOS)
@pytest.mark.parametrize("wanted", ["all", "first", "last"])
def test_every_recorded_change_gathered_is_the_event_the_decoder_makes(
    name: str, wanted: str, streamed: bool
) -> None:
    twins = Twins(lambda: Decoder(picking(wanted)), streamed)
    for msg in SCENARIOS[name]:
        if msg[:1] in (b"R", b"I", b"U", b"D"):
            twins.feed(msg)
    _same_rows(twins.got(), twins.want())
    assert twins.gathering.position == twins.plain.position
    assert twins.told[0] == twins.told[1]


@pytest.mark.parametrize(
    "name", ["insert", "default_update_name", "full_update_email", "full_delete", "partition"]
)
@LAYOUTS
def test_the_common_changes_are_all_gathered_column_wise(name: str, streamed: bool) -> None:
    """INSERT, UPDATE (with and without old tuple), DELETE of FULL identity: every one
    taken. (What is not: a 'K' old tuple without every wanted column, a wanted unchanged
    TOASTed value, a value not UTF-8: the tests above give them to the decoder.)"""
    twins = Twins(lambda: Decoder(picking("first")), streamed)
    changes = 0
    for msg in SCENARIOS[name]:
        if msg[:1] in (b"R", b"I", b"U", b"D"):
            changes += msg[:1] != b"R"
            twins.feed(msg)
    assert changes > 0
    assert twins.taken == changes
    _same_rows(twins.got(), twins.want())


HAND_CHANGES = [
    hand_change(b"I", (b"N", tuple_data(b"Ann", b"7", b"x"))),
    hand_change(b"I", (b"N", tuple_data(None, b"8", None))),
    hand_change(
        b"U", (b"O", tuple_data(b"Ann", b"7", b"x")), (b"N", tuple_data(b"Ann", b"7", b"y"))
    ),
    hand_change(b"U", (b"O", tuple_data(b"Ann", b"7", b"x")), (b"N", tuple_data(b"Bo", b"9", "u"))),
    hand_change(b"U", (b"K", tuple_data(None, b"7", None)), (b"N", tuple_data(b"Cy", b"10", b"x"))),
    hand_change(b"U", (b"N", tuple_data(b"Di", b"11", b"x"))),
    hand_change(b"D", (b"O", tuple_data(b"Ann", b"7", None))),
    hand_change(b"D", (b"K", tuple_data(None, b"12", None))),
    hand_change(b"I", (b"N", tuple_data(b"\xc3\xa9t\xc3\xa9", b"13", b"x" * 300))),
]


@LAYOUTS
@pytest.mark.parametrize("identity", [b"f", b"d"])
@pytest.mark.parametrize("wanted", [["id"], ["name", "id"], ["id", "body"], []])
def test_hand_built_changes_cut_and_flipped_byte_by_byte_gather_as_the_decoder_decodes(
    identity: bytes, wanted: list[str], streamed: bool
) -> None:
    """Every variant either is taken and gives the decoder's event, or is left to the
    decoder with nothing appended: a ProtocolError stays the decoder's to raise."""
    checked = 0
    for msg in HAND_CHANGES:
        laid = streamed_layout(msg, XID) if streamed else msg
        variants = [laid, laid + b"\x00", laid + b"n"]  # trailing bytes
        variants += [laid[:n] for n in range(len(laid))]
        variants += [laid[:i] + bytes([laid[i] ^ 0xFF]) + laid[i + 1 :] for i in range(len(laid))]
        for variant in variants:
            twins = Twins(lambda: Decoder(by_name(columns({HAND: wanted}))), streamed)
            twins.feed(hand_relation(identity))
            twins.feed(variant, laid_out=True)
            _same_rows(twins.got(), twins.want())
            assert twins.told[0] == twins.told[1]
            checked += 1
    assert checked > 1_000


def collector_of(decoder: Decoder, limit: int = 10**6) -> Collector:
    collector = Collector(decoder, limit)
    collector.subxid = XID
    return collector


def test_changes_of_other_subtransactions_and_filtered_relations_are_left_to_the_decoder() -> None:
    insert = streamed_layout(HAND_CHANGES[0], XID)
    decoder = Decoder(by_name(columns({HAND: ["id"]})))
    decoder.decode(hand_relation())
    collector = collector_of(decoder)
    # The open chunk is another (sub)transaction's.
    assert not collector.take(streamed_layout(HAND_CHANGES[0], XID + 1))
    assert collector.take(insert)
    judged = Decoder(
        by_name(columns({HAND: ["id"]}), filters={HAND: ColumnFilter(Judge.IGNORE, ("body",), ())})
    )
    judged.decode(hand_relation())
    assert not collector_of(judged).take(insert)  # a column filter judges its UPDATEs
    assert not collector_of(Decoder(by_name(columns({})))).take(insert)  # never described
    assert not collector.take(b"B" + insert[1:])  # not a change


def test_a_chunk_takes_up_to_its_limit_then_again_after_a_drain() -> None:
    decoder = Decoder(by_name(columns({HAND: ["id"]})))
    decoder.decode(hand_relation())
    collector = collector_of(decoder, limit=3)
    insert = streamed_layout(HAND_CHANGES[0], XID)
    assert [collector.take(insert) for _ in range(4)] == [True, True, True, False]
    assert collector.size == 3
    [pack] = collector.drain()
    assert pack.positions == [1, 2, 3]
    assert collector.size == 0
    assert collector.take(insert)
    assert [p.positions for p in collector.drain()] == [[4]]


def test_a_relation_described_again_mid_chunk_starts_a_new_pack() -> None:
    decoder = Decoder(by_name(columns({HAND: ["name", "id"]})))
    collector = collector_of(decoder)
    decoder.decode(hand_relation())
    assert collector.take(streamed_layout(HAND_CHANGES[0], XID))
    # The same relation now has its columns in another order: (id, name, body).
    cols = b"".join(
        b"\x01" + n + b"\x00" + struct.pack("!Ii", 25, -1) for n in (b"id", b"name", b"body")
    )
    relid = struct.unpack_from("!I", HAND_CHANGES[0], 1)[0]
    collector.close_open()  # (as the stream does on a Relation message inside a block)
    decoder.decode(b"R" + struct.pack("!I", relid) + b"public\x00hand\x00f\x00\x03" + cols)
    assert collector.take(
        streamed_layout(hand_change(b"I", (b"N", tuple_data(b"8", b"Bo", None))), XID)
    )
    packs = collector.drain()
    assert [e.new for p in packs for e in p.events()] == [
        {"name": "Ann", "id": "7"},
        {"id": "8", "name": "Bo"},
    ]
    assert collector.drain() == []


MAPPER = Mapper({HAND: [KeyTemplate.parse("hand:{id}"), KeyTemplate.parse("by-name:{name}")]})


def gathered(*msgs: bytes, identity: bytes = b"f") -> list[ColumnPack]:
    decoder = Decoder(by_name(columns({HAND: ["name", "id"]})))
    decoder.decode(hand_relation(identity))
    collector = collector_of(decoder)
    for msg in msgs:
        assert collector.take(streamed_layout(msg, XID)), msg
    return collector.drain()


def test_a_pack_maps_to_the_keys_of_its_events() -> None:
    packs = gathered(*(m for m in HAND_CHANGES if b"K" not in m[5:6]))
    assert {p.op for p in packs} == {Op.INSERT, Op.UPDATE, Op.DELETE}
    column_wise: dict[int | None, Invalidation] = {}
    for pack in packs:
        assert MAPPER.map_pack(pack.as_pack(), column_wise)
    by_event, failed = MAPPER.map_all([e for p in packs for e in p.events()])
    assert failed == []
    assert column_wise[None].keys == by_event[None].keys
    assert "hand:9" in column_wise[None].keys  # an UPDATE's new key
    assert "by-name:Ann" in column_wise[None].keys  # and its old one


def test_packs_the_mapper_cannot_map_exactly_come_back_as_their_events() -> None:
    """A template needing a column the packs did not gather: map_packs() adds nothing of
    those packs and hands back their events, which map_all() maps one by one: that
    template is swept, each event standing for an unrenderable change (the pack of
    another table maps column-wise)."""
    packs = gathered(HAND_CHANGES[0], HAND_CHANGES[1], HAND_CHANGES[6])
    wants_body = Mapper({HAND: [KeyTemplate.parse("hand:{id}:{body}")]})
    into: dict[int | None, Invalidation] = {}
    mapped, back = map_packs(wants_body, packs, into)
    assert mapped == []
    assert into == {}
    assert back == [e for p in packs for e in p.events()]
    routed, failed = wants_body.map_all(back)
    assert failed == []
    assert routed[None].patterns == {"hand:*:*"}
    ((table, kind), seen) = next(iter(routed[None].stood_in.items()))
    assert (table, kind, seen.times) == (HAND, StandInKind.UNRENDERABLE, len(back))
    assert "'body'" in seen.detail
    mapped, back = map_packs(MAPPER, packs, into)
    assert (mapped, back) == (packs, [])
    assert "hand:7" in into[None].keys


def test_an_update_pack_whose_rows_kept_their_key_columns_is_one_row_for_both() -> None:
    same = hand_change(
        b"U", (b"O", tuple_data(b"Ann", b"7", b"x")), (b"N", tuple_data(b"Ann", b"7", b"y"))
    )
    [pack] = gathered(same, same)
    mapped = pack.as_pack()
    assert mapped.new is mapped.old
    assert all(e.new is e.old for e in pack.events())


def test_history_of_packs_replays_as_their_events() -> None:
    packs = gathered(*HAND_CHANGES[:4], HAND_CHANGES[5], HAND_CHANGES[6], identity=b"f")
    events = [e for p in packs for e in p.events()]
    text = encode_history([], packs=packs)
    assert len(json.loads(text)) == len(packs)  # one item per pack, not per change
    decoded = RowDecoder().history_row(42, text)
    assert decoded.dead == []
    assert sorted(decoded.events, key=repr) == sorted(
        (e._replace(position=42) for e in events), key=repr
    )
    # The transaction goes on the first item, whatever its shape; replay sees it on all.
    transactions: list[tuple[int, int, int] | None] = []
    marked = with_transaction(text, (700, 0x1000, 11))
    assert len(RowDecoder().history_row(42, marked, transactions).events) == len(events)
    assert transactions == [(700, 0x1000, 11)] * len(events)


def test_history_of_packs_replayed_column_wise_gives_the_same_keys() -> None:
    """history_row's map_pack (what replay passes): an item it maps gives no events,
    the same keys as its events mapped one by one; a malformed item, or one read with
    its transactions (explain), is decoded as before."""
    packs = gathered(*HAND_CHANGES[:4], HAND_CHANGES[5], HAND_CHANGES[6], identity=b"f")
    text = encode_history([], packs=packs)
    column_wise: dict[int | None, Invalidation] = {}
    offered: list[Pack] = []

    def map_pack(pack: Pack) -> bool:
        offered.append(pack)
        return MAPPER.map_pack(pack, column_wise)

    decoded = RowDecoder().history_row(42, text, map_pack=map_pack)
    assert decoded.events == []
    assert decoded.dead == []
    assert decoded.mapped_packs == len(packs) == len(offered)
    assert decoded.mapped_changes == sum(len(p) for p in packs)
    by_event, failed = MAPPER.map_all(RowDecoder().history_row(42, text).events)
    assert failed == []
    assert column_wise[None].keys == by_event[None].keys
    # Read with its transactions, or refused by map_pack: its events, as without it.
    events = RowDecoder().history_row(42, text).events
    assert RowDecoder().history_row(42, text, [], map_pack).events == events
    assert RowDecoder().history_row(42, text, None, lambda _p: False).events == events
    bad = json.dumps([["public", "hand", "D", {"id": ["1"]}, None, None, 2]])
    refused = RowDecoder().history_row(7, bad, map_pack=map_pack)
    assert refused.mapped_packs == 0
    assert len(refused.dead) == 1


@pytest.mark.parametrize(
    ("item", "culprits"),
    [
        (["public", "hand", "D", {"id": ["1", "2"]}, None, None, 3], ["event 0", "'id'", "of 2"]),
        (["public", "hand", "D", {"id": ["1"]}, None, None, -1], ["event 0", "count"]),
        (["public", "hand", "T", None, None, None, 1], ["event 0", "'T'"]),
        (["public", "hand", "I", None, None, None, 1], ["event 0", "new is null"]),
        (["public", "hand", "D", ["1"], None, None, 1], ["event 0", "old", "list"]),
    ],
)
def test_a_bad_pack_item_in_history_is_dead_and_its_neighbours_are_not(
    item: list[object], culprits: list[str]
) -> None:
    good = ["public", "hand", "I", None, {"id": ["5", "6"]}, None, 2]
    decoded = RowDecoder().history_row(9, json.dumps([good, item]))
    assert [e.new for e in decoded.events] == [{"id": "5"}, {"id": "6"}]
    [(position, reason)] = decoded.dead
    assert position == 9
    reason = reason.replace("event 1", "event 0")
    for culprit in culprits:
        assert culprit in reason, reason


def test_a_collect_call_that_does_not_fit_is_a_type_error() -> None:
    from cdc_invalidator.capture._walk import Walker  # noqa: PLC0415 - built or not

    walker = Walker(3, ((1, "id"),))
    msg = streamed_layout(HAND_CHANGES[0], XID)
    with pytest.raises(TypeError, match="collect takes"):
        walker.collect(msg, 9, None, ([],))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="one per wanted column"):
        walker.collect(msg, 9, None, ([], []), False)
    with pytest.raises(TypeError, match="one per wanted column"):
        walker.collect(msg, 9, None, ((),), False)  # type: ignore[arg-type]
    assert walker.collect(msg, 9, None, None, False) == 0  # an INSERT needs a new side
    new: tuple[list[object]] = ([],)
    assert walker.collect(msg, 9, None, new, False) == 1
    assert new == (["7"],)
    assert walker.collect(msg, 10**6, None, new, False) == 0
    assert walker.collect(msg, -1, None, new, False) == 0
    assert walker.collect(b"", 9, None, new, False) == 0


def test_a_gatherer_refuses_what_does_not_fit() -> None:
    from cdc_invalidator.capture._walk import Gatherer, Walker  # noqa: PLC0415 - built or not

    insert = streamed_layout(HAND_CHANGES[0], XID)
    with pytest.raises(TypeError, match="start must be callable"):
        Gatherer(None, object(), 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="take"):
        Gatherer(lambda _m: None, object(), 5).take(bytearray(insert))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="returns None or"):
        Gatherer(lambda _m: (1, 2), object(), 5).take(insert)
    walker = Walker(3, ((1, "id"),))
    with pytest.raises(TypeError, match="one per wanted column"):
        Gatherer(lambda _m: (0, walker, None, ([], []), [], True), object(), 5).take(insert)
    with pytest.raises(AttributeError, match="position"):
        Gatherer(lambda _m: (0, walker, None, ([],), [], True), object(), 5).take(insert)
    assert not Gatherer(lambda _m: None, object(), 5).take(insert)  # start() said no


def test_changes_of_two_relations_interleaved_go_to_their_own_packs() -> None:
    other_relid, other = HAND_RELID + 1, TableName("public", "other")
    relation = hand_relation()
    second = b"R" + struct.pack("!I", other_relid) + b"public\x00other\x00" + relation[17:]
    decoder = Decoder(by_name(columns({HAND: ["id"], other: ["id"]})))
    decoder.decode(relation)
    decoder.decode(second)
    collector = collector_of(decoder)
    hand = streamed_layout(hand_change(b"I", (b"N", tuple_data(b"Ann", b"1", None))), XID)
    theirs = streamed_layout(
        b"I" + struct.pack("!I", other_relid) + b"N" + tuple_data(b"Bo", b"2", None), XID
    )
    for msg in (hand, theirs, hand, theirs, theirs, hand):
        assert collector.take(msg)
    got = {
        (e.table.name, e.new["id"] if e.new else None, e.position)
        for p in collector.drain()
        for e in p.events()
    }
    assert got == {
        ("hand", "1", 1),
        ("other", "2", 2),
        ("hand", "1", 3),
        ("other", "2", 4),
        ("other", "2", 5),
        ("hand", "1", 6),
    }


def test_a_change_whose_numbering_fails_leaves_nothing_behind() -> None:
    """The decoder's position is read before anything is appended: a position that is no
    integer raises, and the pack keeps one length in every list."""
    decoder = Decoder(by_name(columns({HAND: ["id"]})))
    decoder.decode(hand_relation())
    collector = collector_of(decoder)
    insert = streamed_layout(HAND_CHANGES[0], XID)
    assert collector.take(insert)
    decoder.position = 1.5  # type: ignore[assignment]
    with pytest.raises(TypeError):
        collector.take(insert)
    decoder.position = 1
    assert collector.take(insert)
    [pack] = collector.drain()
    assert pack.positions == [1, 2]
    assert pack.new == (["7", "7"],)


class Reentering:
    """A decoder whose position, when read, takes another message first (a Python hook
    run from inside take()): the C must not hold on to its entries across it."""

    def __init__(self, inner: Decoder, msgs: list[bytes]) -> None:
        self.inner = inner
        self.msgs = msgs
        self.collector: Collector | None = None
        self.relations = inner.relations

    @property
    def position(self) -> int:
        if self.msgs and self.collector is not None:
            self.collector.take(self.msgs.pop())
        return self.inner.position

    @position.setter
    def position(self, value: int) -> None:
        self.inner.position = value

    def missing_old(self, relation: Relation) -> None:
        self.inner.missing_old(relation)


def test_a_take_re_entered_from_python_code_it_calls_is_refused_leaving_nothing() -> None:
    decoder = Decoder(by_name(columns({HAND: ["id"], TableName("public", "other"): ["id"]})))
    decoder.decode(hand_relation())
    relid = HAND_RELID + 1
    decoder.decode(b"R" + struct.pack("!I", relid) + b"public\x00other\x00" + hand_relation()[17:])
    other = streamed_layout(
        b"I" + struct.pack("!I", relid) + b"N" + tuple_data(b"Bo", b"2", None), XID
    )
    reentering = Reentering(decoder, [other])
    collector = Collector(reentering, 10**6)  # type: ignore[arg-type]
    collector.subxid = XID
    reentering.collector = collector
    with pytest.raises(RuntimeError, match="inside take"):
        collector.take(streamed_layout(HAND_CHANGES[0], XID))
    assert collector.drain() == []  # nothing half done
    assert decoder.position == 0
    assert collector.take(other)  # and it goes on
    assert [p.positions for p in collector.drain()] == [[1]]
