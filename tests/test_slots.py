"""sink/slots.py: a Redis Cluster's hash slots and the RESP of UNLINKs, the C versions
(sink/_slots.c) against the Python ones and redis-py's (the cluster's own answer is in
test_cluster.py)."""

from __future__ import annotations

import random

import pytest
from redis.connection import Connection
from redis.crc import key_slot

from cdc_invalidator.checks import Report, check_slots
from cdc_invalidator.sink import slots

KEYS: list[str | bytes] = [
    "user:1",
    b"user:2",
    "user:email:u1@example.com",
    "{user}:1",
    "{user}:2",  # a hash tag: the same slot as {user}:1
    "a{user}b",
    "{}user",  # an empty tag: the whole key is hashed
    "{user",  # no closing brace
    "}user{",  # a closing brace before the opening one
    "x{a}{b}",  # the first tag only
    "{{a}}",
    "",
    "café:é",  # UTF-8 of more than one byte per character
    "日本:{日}",
    b"\x00\xff{\x01}",
]


def _random_keys(n: int) -> list[str | bytes]:
    rng = random.Random(7)  # noqa: S311 - test data, seeded: repeatable
    alphabet = "ab{}:é日\x00"
    out: list[str | bytes] = []
    for _ in range(n):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 9)))
        out.append(key.encode() if rng.random() < 0.3 else key)
    return out


def _encoded(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode()


def test_the_c_versions_are_built() -> None:
    """Where a C compiler is (this machine, the image): a build that lost them would run
    the Python versions silently."""
    assert slots.NATIVE_SLOTS


@pytest.mark.parametrize("group", [slots.group_by_slot, slots._group_by_slot])
def test_keys_are_grouped_under_redis_pys_slots(group: slots.GroupBySlot) -> None:
    keys = KEYS + _random_keys(5000)
    grouped = group(keys)
    expected: dict[int, list[str | bytes]] = {}
    for key in keys:
        expected.setdefault(key_slot(_encoded(key)), []).append(key)
    assert grouped == expected
    assert list(grouped) == list(expected)  # slots in the order their first key came
    assert grouped[key_slot(b"user")] == ["{user}:1", "{user}:2", "a{user}b"]


def test_a_batch_of_ten_thousand_keys_spreads_over_thousands_of_slots() -> None:
    """Why the grouping is worth C: one UNLINK per slot, about 7,000 of them."""
    keys = [f"user:{i}" for i in range(5000)] + [f"user:email:u{i}@x" for i in range(5000)]
    assert slots.group_by_slot(keys) == slots._group_by_slot(keys)
    assert len(slots.group_by_slot(keys)) > 6000


@pytest.mark.parametrize("pack", [slots.pack_unlinks, slots._pack_unlinks])
def test_unlinks_are_packed_as_redis_py_packs_them(pack: slots.PackUnlinks) -> None:
    commands = [[key] for key in KEYS] + [KEYS, [b"k" * 100_000, "x"]]
    packed = pack(commands)
    connection = Connection()
    ours = connection.pack_commands([("UNLINK", *map(_encoded, keys)) for keys in commands])
    assert packed == b"".join(ours)
    assert pack([]) == b""


@pytest.mark.parametrize(
    "call",
    [slots.group_by_slot, slots._group_by_slot, lambda k: slots.pack_unlinks([k])],
)
def test_a_key_that_is_neither_str_nor_bytes_is_refused(call: slots.GroupBySlot) -> None:
    with pytest.raises((TypeError, AttributeError)):
        call(["user:1", 7])  # type: ignore[list-item]  # what is tested


def test_a_str_that_is_not_utf8_is_refused_as_str_encode_refuses_it() -> None:
    lone = "user:\udc80"  # a lone surrogate
    for call in (slots.group_by_slot, lambda k: slots.pack_unlinks([k])):
        with pytest.raises(UnicodeEncodeError):
            call([lone])


def test_a_command_that_is_not_a_list_is_refused() -> None:
    with pytest.raises(TypeError, match="a command must be a list of keys"):
        slots.pack_unlinks([("user:1",)])  # type: ignore[list-item]  # what is tested


def test_check_says_whether_the_c_versions_run() -> None:
    built, missing = Report(), Report()
    check_slots(built, native=True)
    check_slots(missing, native=False)
    assert "sink/_slots.c" in built.ok[0]
    assert not built.warnings
    assert missing.passed
    assert "sink/_slots.c was not built" in missing.warnings[0]
