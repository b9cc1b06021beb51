"""Pure units: key templates, table names and the event -> keys mapping (no servers)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from fnmatch import fnmatchcase

import pytest

from cdc_invalidator.events import ChangeEvent, InvalidEvent, Op, Pack, TableName
from cdc_invalidator.events import StandInKind as Kind
from cdc_invalidator.mapping import Invalidation, KeyTemplate, Mapper, TemplateError
from cdc_invalidator.mapping.mapper import Retired, Routed, StoodIn, merge

USERS = TableName("public", "users")


@pytest.mark.parametrize(
    ("source", "row", "key"),
    [
        ("user:{id}", {"id": "7"}, "user:7"),
        ("user:email:{email}", {"email": "a@x"}, "user:email:a@x"),
        ("{{literal}}:{id}", {"id": "1"}, "{literal}:1"),
        ("a}}b:{id}:{{x}}", {"id": "2"}, "a}b:2:{x}"),
        ("u:{tenant}:{id}", {"tenant": "t", "id": "9"}, "u:t:9"),
        ("all-users", {}, "all-users"),
        ("user:{Weird Col}", {"Weird Col": "x"}, "user:x"),
    ],
)
def test_template_renders(source: str, row: dict[str, str], key: str) -> None:
    assert KeyTemplate.parse(source).render(row) == key


def test_null_field_skips_the_key() -> None:
    assert KeyTemplate.parse("user:email:{email}").render({"email": None}) is None


def test_null_field_of_several_skips_the_key_before_a_missing_column() -> None:
    assert KeyTemplate.parse("u:{tenant}:{id}").render({"tenant": None}) is None


def test_missing_column_is_invalid_naming_column_and_template() -> None:
    with pytest.raises(
        InvalidEvent, match=r"lacks column 'email' used by template 'user:email:\{email\}'"
    ):
        KeyTemplate.parse("user:email:{email}").render({"id": "1"})
    with pytest.raises(InvalidEvent, match=r"lacks column 'id' used by template 'u:\{t\}:\{id\}'"):
        KeyTemplate.parse("u:{t}:{id}").render({"t": "x"})


@pytest.mark.parametrize("source", ["user:{id}", "u:{t}:{id}"])
def test_non_text_value_is_invalid(source: str) -> None:
    with pytest.raises(
        InvalidEvent, match=r"template '.*': column 'id' holds int 1, expected text"
    ):
        KeyTemplate.parse(source).render({"t": "x", "id": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("user:{id", "unbalanced '{'"),
        ("user:id}", "unbalanced '}'"),
        ("user:{}", "empty field"),
        ("user:{a{b}", "unbalanced '{'"),
        ("", "empty"),
    ],
)
def test_bad_templates_are_named(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message) as info:
        KeyTemplate.parse(source)
    assert repr(source) in str(info.value)


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("user:{id}", "user:*"),
        ("user:{id}:orders", "user:*:orders"),
        ("u:{a}:{b}", "u:*:*"),
        ("we*ird?[x]\\:{id}", "we\\*ird\\?\\[x\\]\\\\:*"),
        ("{{x}}:{id}", "{x}:*"),
        ("all-users", "all-users"),
    ],
)
def test_glob_escapes_literals(source: str, pattern: str) -> None:
    assert KeyTemplate.parse(source).glob() == pattern


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("{a}:{b}", "it begins with the field {a}"),
        ("{a}", "it begins with the field {a}"),
        ("{a}-{b}", "it begins with the field {a}"),
        ("{id}:user", "it begins with the field {id}"),  # sweeps *:user
        (":{id}", "it begins with ':', which holds no letter or digit"),
        ("*-/{id}", "it begins with '*-/', which holds no letter or digit"),
    ],
)
def test_a_template_whose_sweep_reaches_beyond_it_is_too_broad(source: str, why: str) -> None:
    assert KeyTemplate.parse(source).too_broad() == why


@pytest.mark.parametrize(
    "source", ["user:{id}", "u{id}", "7:{id}", "{{x}}:{id}", "ü:{id}", "all-users", "-", "::"]
)
def test_a_literal_prefix_with_a_letter_or_digit_confines_the_sweep(source: str) -> None:
    # A template without fields sweeps exactly its one key: never too broad.
    assert KeyTemplate.parse(source).too_broad() is None


@pytest.mark.parametrize(
    ("source", "key"),
    [("user:{id}", "user:1"), ("u:{a}:{b}:x", "u:1:1:x"), ("all-users", "all-users")],
)
def test_a_sample_key_has_1_in_every_field(source: str, key: str) -> None:
    assert KeyTemplate.parse(source).sample() == key


@pytest.mark.parametrize(
    ("source", "key", "swept"),
    [
        ("user:{id}", "user:settings:1", True),  # a `*` matches separators too
        ("user:{id}", "user:1:orders", True),
        ("user:{id}", "user:", True),
        ("user:{id}:orders", "user:1", False),
        ("user:{id}", "users:1", False),
        ("order:{id}", "order_item:1", False),
        ("user:{id}", "user:line\nbreak", True),
        # Escaped glob characters match only themselves.
        ("a*:{id}", "a*:1", True),
        ("a*:{id}", "ab:1", False),
        ("q?[x]\\:{id}", "q?[x]\\:1", True),
        ("q?[x]\\:{id}", "qz[x]\\:1", False),
        ("q?[x]\\:{id}", "q?x\\:1", False),
        ("all-users", "all-users", True),
        ("all-users", "all-users2", False),
    ],
)
def test_sweeps_matches_as_redis_matches_the_glob(source: str, key: str, swept: bool) -> None:
    template = KeyTemplate.parse(source)
    assert template.sweeps(key) is swept
    # The same answer as the glob Redis is given, read by fnmatch.
    assert fnmatchcase(key, _fnmatch_pattern(template.glob())) is swept


def _fnmatch_pattern(redis_glob: str) -> str:
    """A Redis MATCH pattern of `*` and escaped characters, as fnmatch reads it."""
    out, escaped = [], False
    for ch in redis_glob:
        if escaped:
            out.append(f"[{ch}]" if ch in "*?[" else ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def _mapper() -> Mapper:
    return Mapper(
        {USERS: [KeyTemplate.parse("user:{id}"), KeyTemplate.parse("user:email:{email}")]}
    )


def _event(
    op: Op,
    old: dict[str, str | None] | None,
    new: dict[str, str | None] | None,
    table: TableName = USERS,
) -> ChangeEvent:
    return ChangeEvent(table, op, old, new, position=1)


def _keys(event: ChangeEvent) -> Invalidation:
    work = Invalidation()
    _mapper().add(event, work)
    return work


def test_insert_deletes_new_row_keys() -> None:
    work = _keys(_event(Op.INSERT, None, {"id": "1", "email": "a@x"}))
    assert work.keys == {"user:1", "user:email:a@x"}
    assert not work.patterns


def test_delete_deletes_old_row_keys() -> None:
    assert _keys(_event(Op.DELETE, {"id": "1", "email": "a@x"}, None)).keys == {
        "user:1",
        "user:email:a@x",
    }


def test_update_deletes_old_and_new_keys() -> None:
    work = _keys(_event(Op.UPDATE, {"id": "1", "email": "a@x"}, {"id": "2", "email": "b@x"}))
    assert work.keys == {"user:1", "user:2", "user:email:a@x", "user:email:b@x"}


def test_update_with_null_email_keeps_other_keys() -> None:
    work = _keys(_event(Op.UPDATE, {"id": "1", "email": None}, {"id": "1", "email": "b@x"}))
    assert work.keys == {"user:1", "user:email:b@x"}


def test_truncate_becomes_patterns() -> None:
    work = _keys(_event(Op.TRUNCATE, None, None))
    assert work.patterns == {"user:*", "user:email:*"}
    assert not work.keys


def test_unknown_table_is_invalid() -> None:
    with pytest.raises(InvalidEvent, match="orders is not in the configuration"):
        _keys(_event(Op.INSERT, None, {"id": "1"}, table=TableName("public", "orders")))


def test_a_table_the_configuration_lacks_is_rendered_with_its_last_installed_templates() -> None:
    """A change of a table an install stopped watching, committed before it: rendered
    with the templates (and Redis database) the last mapping naming it recorded, looked
    up once; a table no mapping named stays a dead letter, also looked up once."""
    orders, ghost = TableName("public", "orders"), TableName("public", "ghost")
    asked: list[TableName] = []

    def lookup(table: TableName) -> Retired | None:
        asked.append(table)
        return Retired((KeyTemplate.parse("order:{id}"),), 3) if table == orders else None

    mapper = Mapper({USERS: [KeyTemplate.parse("user:{id}")]}, retired=lookup)
    events = [
        _event(Op.INSERT, None, {"id": "1"}),
        _event(Op.UPDATE, {"id": "7"}, {"id": "7"}, table=orders),
        _event(Op.INSERT, None, {"id": "9"}, table=ghost),
    ]
    routed, failed = mapper.map_all(events)
    assert routed[None].keys == {"user:1"}
    assert routed[3].keys == {"order:7"}
    assert [(e.table, str(exc)) for e, exc in failed] == [
        (ghost, "table public.ghost is not in the configuration")
    ]
    routed, failed = mapper.map_all(events)
    assert routed[3].keys == {"order:7"}
    assert asked == [orders, ghost]  # once each
    assert list(mapper.tables) == [USERS]  # watched, swept: the configured ones only
    assert mapper.sweep_all()[None].patterns == {"user:*"}


def test_a_batch_adopting_a_table_with_a_redis_db_of_its_own_is_mapped_once() -> None:
    """map_all() resolves the batch's tables before grouping it by Redis database: a
    table adopted with its own redis_db does not make it map the batch a second time
    (it did: once ungrouped, then again grouped, 3 add_all() calls for 2 databases)."""
    orders = TableName("public", "orders")
    groups: list[int] = []

    class Counted(Mapper):
        def add_all(
            self, events: Iterable[ChangeEvent], into: Invalidation
        ) -> list[tuple[ChangeEvent, InvalidEvent]]:
            events = list(events)
            groups.append(len(events))
            return super().add_all(events, into)

    def lookup(table: TableName) -> Retired | None:
        return Retired((KeyTemplate.parse("order:{id}"),), 3) if table == orders else None

    mapper = Counted({USERS: [KeyTemplate.parse("user:{id}")]}, retired=lookup)
    events = [
        _event(Op.INSERT, None, {"id": "1"}),
        _event(Op.INSERT, None, {"id": "7"}, table=orders),
        _event(Op.INSERT, None, {"id": "2"}),
    ]
    routed, failed = mapper.map_all(events)
    assert (routed[None].keys, routed[3].keys, failed) == ({"user:1", "user:2"}, {"order:7"}, [])
    assert sorted(groups) == [1, 2]  # one add_all() per database, each event once


def test_a_retired_table_is_rendered_with_its_earlier_templates_too_sweeping_none() -> None:
    """A table removed, added again otherwise, removed again: each change is rendered
    with the last templates and with each earlier mapping's (under its own Redis
    database), for a change committed under one of those. An earlier template whose
    column the row lacks was not the table's when the change was captured: not swept."""
    orders = TableName("public", "orders")
    parse = KeyTemplate.parse
    retired = Retired(
        (parse("b:{id}"),), None, (((parse("a:{id}"),), 2), ((parse("c:{email}"),), None))
    )
    mapper = Mapper({USERS: [parse("user:{id}")]}, retired=lambda t: retired)
    events = [_event(Op.UPDATE, {"id": "7"}, {"id": "7"}, table=orders)]
    routed, failed = mapper.map_all(events)
    assert failed == []
    assert routed[None].keys == {"b:7"}
    assert routed[None].patterns == set()
    assert routed[2].keys == {"a:7"}
    cols = {"id": ["7"]}
    assert mapper.map_pack(Pack(orders, Op.UPDATE, cols, cols, 1), {}) is False


def test_missing_row_is_invalid() -> None:
    with pytest.raises(InvalidEvent, match="carries no old row"):
        _keys(_event(Op.DELETE, None, None))


def test_a_row_lacking_a_template_column_sweeps_that_template_naming_column_and_template() -> None:
    """Its keys cannot all be known (a change captured for the templates before an
    install added one): the template it lacks a column of is swept, the others' keys
    deleted as always, and nothing is a dead letter."""
    work = _keys(_event(Op.UPDATE, {"id": "1", "email": "a@x"}, {"id": "2"}))
    assert work.keys == {"user:1", "user:2"}
    assert work.patterns == {"user:email:*"}
    assert work.stood_in == {
        (USERS, Kind.UNRENDERABLE): StoodIn(
            "new row of public.users lacks column 'email' used by template 'user:email:{email}'"
            " (captured before install added the template, or, in a SQL_ASCII database, a "
            "value that is not UTF-8)",
            1,
        )
    }


def test_a_failing_event_adds_nothing() -> None:
    work = Invalidation()
    with pytest.raises(InvalidEvent, match=r"column 'id' holds int 2, expected text"):
        _mapper().add(
            _event(Op.UPDATE, {"id": "1", "email": "a@x"}, {"id": 2, "email": "b@x"}),  # type: ignore[dict-item]
            work,
        )
    assert not work


def test_columns_are_the_union_of_template_fields() -> None:
    assert _mapper().columns(USERS) == ["email", "id"]


@pytest.mark.parametrize(
    ("text", "table"),
    [
        ("users", TableName("public", "users")),
        ("public.users", TableName("public", "users")),
        ("App.Users", TableName("app", "users")),
        ('"App"."Users"', TableName("App", "Users")),
        ('public."Weird ""Name"""', TableName("public", 'Weird "Name"')),
        ('"a.b".c', TableName("a.b", "c")),
    ],
)
def test_table_names_parse_like_postgres(text: str, table: TableName) -> None:
    assert TableName.parse(text) == table


@pytest.mark.parametrize("text", ["", "a.b.c", '"unterminated', "a..b", 'a"b', "."])
def test_bad_table_names(text: str) -> None:
    with pytest.raises(ValueError, match=r"table name|identifier"):
        TableName.parse(text)


def test_qualified_quotes_only_when_needed() -> None:
    assert TableName("public", "users").qualified == "public.users"
    assert TableName("public", 'Weird "Name"').qualified == 'public."Weird ""Name"""'
    assert TableName("App", "x").qualified == '"App".x'


@pytest.mark.parametrize("reverse", [False, True])
def test_add_all_matches_add_event_by_event(reverse: bool) -> None:
    mapper = Mapper(
        {
            USERS: [KeyTemplate.parse("user:{id}"), KeyTemplate.parse("user:email:{email}")],
            TableName("public", "pairs"): [KeyTemplate.parse("pair:{a}:{b}")],
        }
    )
    same: dict[str, str | None] = {"id": "1", "email": "a@x"}
    events = [
        _event(Op.INSERT, None, {"id": "1", "email": "a@x"}),
        _event(Op.UPDATE, same, same),
        _event(Op.UPDATE, {"id": "1", "email": "a@x"}, {"id": "2", "email": None}),
        _event(Op.DELETE, {"id": "3", "email": "c@x"}, None),
        _event(Op.DELETE, None, None),
        _event(Op.INSERT, None, {"id": "4"}),
        _event(Op.INSERT, None, {"id": 5, "email": "e@x"}),  # type: ignore[dict-item]
        _event(Op.TRUNCATE, None, None),
        _event(Op.INSERT, None, {"a": "x", "b": "y"}, table=TableName("public", "pairs")),
        _event(Op.INSERT, None, {"id": "6"}, table=TableName("public", "ghost")),
    ]
    if reverse:  # (failures in a table's rows before and after those of other events)
        events.reverse()
    expected = Invalidation()
    expected_failures = []
    for event in events:
        try:
            mapper.add(event, expected)
        except InvalidEvent as exc:
            expected_failures.append((event, str(exc)))
    got = Invalidation()
    failures = [(event, str(exc)) for event, exc in mapper.add_all(events, got)]
    assert failures == expected_failures
    assert len(failures) == 3
    assert got.patterns == expected.patterns
    assert got.keys == expected.keys
    assert got.stood_in == expected.stood_in
    assert (USERS, Kind.UNRENDERABLE) in got.stood_in  # {"id": "4"} lacks email


def test_map_all_routes_each_table_to_its_database() -> None:
    users, orders = TableName("public", "users"), TableName("public", "orders")
    mapper = Mapper(
        {users: [KeyTemplate.parse("user:{id}")], orders: [KeyTemplate.parse("order:{id}")]},
        {orders: 3},
    )
    events = [
        ChangeEvent(users, Op.INSERT, None, {"id": "1"}, 1),
        ChangeEvent(orders, Op.DELETE, {"id": "2"}, None, 2),
        ChangeEvent(orders, Op.TRUNCATE, None, None, 3),
        ChangeEvent(orders, Op.INSERT, None, {"id": 7}, 4),  # type: ignore[dict-item]
    ]
    routed, failed = mapper.map_all(events)
    assert routed == {
        None: Invalidation({"user:1"}),
        3: Invalidation({"order:2"}, {"order:*"}),
    }
    assert [event.position for event, _ in failed] == [4]


def test_map_all_without_routes_is_one_invalidation() -> None:
    users = TableName("public", "users")
    mapper = Mapper({users: [KeyTemplate.parse("user:{id}")]})
    routed, failed = mapper.map_all([ChangeEvent(users, Op.INSERT, None, {"id": "1"}, 1)])
    assert (routed, failed) == ({None: Invalidation({"user:1"})}, [])


# --- filters: what apps do to a value before it goes into a key ---------------------------


@pytest.mark.parametrize(
    ("source", "value", "key"),
    [
        ("user:email:{email|lower}", "Ann@X.org", "user:email:ann@x.org"),
        ("code:{code|upper}", "ab-1", "code:AB-1"),
        ("code:{code|trim}", " \tab 1\n", "code:ab 1"),
        ("code:{code|trim|upper}", "  ab ", "code:AB"),
        ("code:{code | trim | lower}", " AB ", "code:ab"),  # spaces around `|`
        ("user:email:{email|lower}", "ÀNN@X", "user:email:ànn@x"),  # Unicode, as str.lower()
        (
            "q:{q|md5}",
            "long query",
            "q:5f175282b7d11eecb82d3b2a887450d6",
        ),  # Django's make_template_fragment_key hash
        ("q:{q|sha1}", "x", "q:11f6ad8ec52a2984abaafd7c3b516503785c2072"),
        (
            "q:{q|sha256}",
            "x",
            "q:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
        ),
        ("q:{q|sha256}", "é", "q:" + hashlib.sha256("é".encode()).hexdigest()),  # UTF-8
        ("path:{p|urlencode}", "a b/c:d~é", "path:a%20b%2Fc%3Ad~%C3%A9"),
        ("u:{t|lower}:{id}", "T", "u:t:7"),
    ],
)
def test_filters_render(source: str, value: str, key: str) -> None:
    template = KeyTemplate.parse(source)
    (column, *_) = template.fields
    assert template.render({column: value, "id": "7"}) == key


def test_a_filtered_field_is_its_column_for_everything_else() -> None:
    template = KeyTemplate.parse("u:{tenant|lower}:{email|trim|lower}")
    assert template.fields == ("tenant", "email")
    assert template.filters == (("lower",), ("trim", "lower"))
    assert template.glob() == "u:*:*"  # a TRUNCATE sweep matches every filtered value
    assert template.sample() == "u:1:1"
    assert KeyTemplate.parse("q:{q|md5}").sample() == "q:c4ca4238a0b923820dcc509a6f75849b"


def test_filters_keep_the_null_and_missing_column_rules() -> None:
    template = KeyTemplate.parse("u:{tenant|lower}:{id|md5}")
    assert template.render({"tenant": None}) is None
    with pytest.raises(InvalidEvent, match=r"lacks column 'id' used by template"):
        template.render({"tenant": "T"})
    with pytest.raises(InvalidEvent, match=r"column 'id' holds int 1, expected text"):
        template.render({"tenant": "T", "id": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("user:{email|lowr}", r"template 'user:\{email\|lowr\}': unknown filter 'lowr'"),
        ("user:{email|}", r"unknown filter '' in \{email\|\}"),
        ("user:{email|lower|}", r"unknown filter ''"),
        ("user:{|lower}", r"field \{\|lower\} names no column"),
    ],
)
def test_a_bad_filter_is_a_template_error_naming_the_template(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        KeyTemplate.parse(source)
    with pytest.raises(TemplateError, match="known: lower, upper, trim, md5, sha1, sha256"):
        KeyTemplate.parse("u:{x|nope}")


@pytest.mark.parametrize("source", ["user:{id}", "{id}", "u:{id}:x", "u:{id|lower}", "p:{a}:{id}"])
def test_render_all_gives_what_render_gives_row_by_row(source: str) -> None:
    template = KeyTemplate.parse(source)
    rows: list[dict[str, str | None]] = [
        {"id": "1", "a": "A"},
        {"id": None, "a": "A"},
        {"id": "É:*", "a": None},
        {"id": "", "a": ""},
    ]
    expected = [k for row in rows if (k := template.render(row)) is not None]
    assert template.render_all(rows) == expected
    assert template.render_all([]) == []


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"other": "1"}, "lacks column 'id'"),
        ({"id": 5}, "column 'id' holds int 5, expected text"),
    ],
)
@pytest.mark.parametrize("source", ["user:{id}", "user:{id|lower}"])
def test_render_all_of_a_bad_row_raises_what_render_raises(
    source: str, bad: dict[str, object], error: str
) -> None:
    template = KeyTemplate.parse(source)
    rows = [{"id": "1"}, bad, {"id": "2"}]
    with pytest.raises(InvalidEvent, match=error):
        template.render_all(rows)  # type: ignore[arg-type]


def test_merge_carries_keys_patterns_and_the_stand_ins() -> None:
    """A streamed transaction's keys reach the runner through merge(): the tables swept
    for what their TRUNCATE events stood for must too, to be counted and logged."""
    orders = TableName("public", "orders")
    into: Routed = {None: Invalidation({"a"}, {"p:*"})}
    first = Invalidation({"b"}, {"q:*"})
    first.add_stand_in(USERS, Kind.UNRENDERABLE, "gone")
    first.add_stand_in(orders, Kind.BULK, "1000", times=2)
    merge(into, {None: first, 2: Invalidation({"c"})})
    later = Invalidation()
    later.add_stand_in(USERS, Kind.UNRENDERABLE, "dropped")
    later.add_stand_in(orders, Kind.BULK, "5000")
    merge(into, {None: later})
    assert into[None] == Invalidation(
        {"a", "b"},
        {"p:*", "q:*"},
        {
            (USERS, Kind.UNRENDERABLE): StoodIn("dropped", 2),
            (orders, Kind.BULK): StoodIn("5000", 3),
        },
    )
    assert into[2] == Invalidation({"c"})


def test_a_truncate_standing_in_is_swept_and_noted_per_table_and_kind() -> None:
    """Stand-ins sweep like a TRUNCATE and are noted by table and kind, the last one's
    detail with how many: a real TRUNCATE notes nothing."""
    mapper = Mapper({USERS: [KeyTemplate.parse("user:{id}")]})
    into = Invalidation()
    # (the markers as the queue's SQL and the logical capture write them)
    rows = ({"bulk": 1000}, {"unrenderable": "why"}, {"bulk": 2000}, {"resync": "lost"}, None)
    for new in rows:
        mapper.add(ChangeEvent(USERS, Op.TRUNCATE, None, new, 1), into)  # type: ignore[arg-type]
    assert into.patterns == {"user:*"}
    assert into.stood_in == {
        (USERS, Kind.BULK): StoodIn("2000", 2),
        (USERS, Kind.UNRENDERABLE): StoodIn("why", 1),
        (USERS, Kind.RESYNC): StoodIn("lost", 1),
    }


def test_a_row_lacking_a_column_with_another_value_not_text_sweeps_both_templates() -> None:
    """Written by hand: one template lacks its column, another's value is not text. Both
    are swept; the lacking one's sweep was lost to a dead letter when the other came
    second."""
    mapper = Mapper(
        {USERS: [KeyTemplate.parse("user:email:{email}"), KeyTemplate.parse("user:{id}")]}
    )
    work = Invalidation()
    mapper.add(_event(Op.INSERT, None, {"id": 5}), work)  # type: ignore[dict-item]
    assert work.patterns == {"user:email:*", "user:*"}
    assert work.keys == set()
