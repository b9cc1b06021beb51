"""SecondDeletes: what is owed, held compactly, comes back whole and in bounded groups.

The sink is a recorder: these are the loop's bookkeeping, whose effect on a real Redis
the runner's and the chaos tests check."""

from __future__ import annotations

import time

from cdc_invalidator.events import TableName
from cdc_invalidator.mapping import KEYS_SEP, Invalidation, Routed
from cdc_invalidator.second_deletes import SECOND_DELETE_GROUP, SecondDeletes


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Routed] = []

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        self.calls.append(works)
        return sum(len(work.keys) for work in works.values())


def owed_by(sink: Recorder, delay_s: float = 0.3) -> tuple[SecondDeletes, list[int]]:
    counted: list[int] = []
    return SecondDeletes(sink, delay_s, counted.append), counted  # type: ignore[arg-type]


def test_batches_merged_into_one_due_come_back_whole_in_bounded_groups() -> None:
    sink = Recorder()
    later, counted = owed_by(sink)
    visible = time.monotonic()
    batches = 25
    per_batch = 3_000  # not a divisor of the group: batches are split between groups
    for b in range(batches):  # a bulk statement's batches: all visible at its commit
        keys = {f"user:{b * per_batch + i}" for i in range(per_batch)}
        later.add({None: Invalidation(keys)}, visible)
    later.add({3: Invalidation({"other:db"})}, visible)

    later.run(until=visible + 0.29)
    assert sink.calls == []  # not due yet
    later.run(until=visible + 0.31)

    to_db0 = [works[None].keys for works in sink.calls if None in works]
    assert all(len(keys) <= SECOND_DELETE_GROUP for keys in to_db0)
    assert len(to_db0) == -(-batches * per_batch // SECOND_DELETE_GROUP)
    everything = [key for keys in to_db0 for key in keys]
    assert len(everything) == len(set(everything)) == batches * per_batch
    assert [works[3].keys for works in sink.calls if 3 in works] == [{"other:db"}]
    assert sum(counted) == batches * per_batch + 1
    assert later.next_due is None


def test_a_key_holding_the_separator_and_a_batchs_patterns_are_kept() -> None:
    sink = Recorder()
    later, _ = owed_by(sink)
    visible = time.monotonic()
    table = TableName("public", "users")
    odd = f"user{KEYS_SEP}1"  # a template's literal may hold anything
    later.add({None: Invalidation({odd, "user:2"}, {"user:*"}, {table: "why"})}, visible)
    later.add({None: Invalidation({"user:3"})}, visible)
    later.run(until=visible + 1)

    (works,) = sink.calls
    assert works[None].keys == {odd, "user:2", "user:3"}
    assert works[None].patterns == {"user:*"}
    assert works[None].unrenderable == {table: "why"}


def test_batches_apart_are_separate_second_deletes_in_order() -> None:
    sink = Recorder()
    later, _ = owed_by(sink)
    start = time.monotonic()
    later.add({None: Invalidation({"a"})}, start)
    later.add({None: Invalidation({"b"})}, start + 0.05)  # past the merge window
    first_due = later.next_due
    assert first_due is not None
    later.run(until=first_due)
    assert [works[None].keys for works in sink.calls] == [{"a"}]
    later.run(until=first_due + 0.05)
    assert [works[None].keys for works in sink.calls] == [{"a"}, {"b"}]
