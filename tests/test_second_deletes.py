"""SecondDeletes: what is owed, held compactly, comes back whole and in bounded groups.

The sink is a recorder: these are the loop's bookkeeping, whose effect on a real Redis
the runner's and the chaos tests check. Then which queue rows a next listener redoes
(redo_owed, trigger mode), read on a real server: those its predecessor processed, not
its backlog (test_replay runs the whole of it in both modes)."""

from __future__ import annotations

import time

import pytest
import redis

from cdc_invalidator.capture.rows import Decoded
from cdc_invalidator.mapping import KEYS_SEP, Invalidation, Mapper, Routed
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.redis_guard.window import MARGIN_S
from cdc_invalidator.second_deletes import SECOND_DELETE_GROUP, SecondDeletes, redo_owed
from tests.support.env import Env
from tests.support.faults import setup_users


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


def test_a_key_holding_the_separator_is_kept_whole() -> None:
    sink = Recorder()
    later, _ = owed_by(sink)
    visible = time.monotonic()
    odd = f"user{KEYS_SEP}1"  # a template's literal may hold anything
    later.add({None: Invalidation({odd, "user:2"})}, visible)
    later.add({None: Invalidation({"user:3"})}, visible)
    later.run(until=visible + 1)

    (works,) = sink.calls
    assert works[None].keys == {odd, "user:2", "user:3"}


class Hanging(Recorder):
    """Redis that times out: every call costs its timeout, then raises."""

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        self.calls.append(works)
        raise redis.TimeoutError("Timeout reading from socket")


def test_on_shutdown_second_deletes_are_given_up_at_the_first_redis_failure() -> None:
    """Tried on one by one, each owed group waited out Redis's timeout (two tries of
    5 s): a stop asked of a listener whose Redis hangs took minutes, past systemd's
    90 s, and said nothing of what it gave up."""
    sink = Hanging()
    later, counted = owed_by(sink)
    visible = time.monotonic()
    for b in range(3):  # three dues, 20 ms apart: three calls, were each tried
        later.add({None: Invalidation({f"user:{b}:a", f"user:{b}:b"})}, visible + 0.02 * b)
    assert later.finish() == 6  # (and logged as second_deletes_given_up)
    assert len(sink.calls) == 1
    assert later.next_due is None
    assert counted == []

    # Redis already seen failing on the way out: none is tried.
    later.add({None: Invalidation({"user:9"})}, time.monotonic())
    assert later.finish(redis.ConnectionError("refused")) == 1
    assert len(sink.calls) == 1
    assert later.next_due is None


def test_patterns_are_owed_nothing_the_sweeper_sweeps_them_again() -> None:
    """Keys only: a batch of patterns alone owes no second delete here (the sweeper
    does a sweep's second sweep), and one with keys owes its keys."""
    sink = Recorder()
    later, _ = owed_by(sink)
    visible = time.monotonic()
    later.add({None: Invalidation(patterns={"user:*"})}, visible)
    assert later.next_due is None
    later.add({None: Invalidation({"user:1"}, {"user:*"})}, visible)
    later.run(until=visible + 1)
    assert [works[None] for works in sink.calls] == [Invalidation({"user:1"})]


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


@pytest.mark.servers
class LastAcknowledged:
    """An Acknowledged history that last acknowledged `ago` seconds back and records the
    window it is asked for (nothing in it)."""

    history_table = "cdc_invalidator.fake"

    def __init__(self, ago: float) -> None:
        self.ago = ago
        self.asked: list[float] = []

    def last_acknowledged_s(self, conn: object) -> float:
        return self.ago

    def acknowledged(self, conn: object, since_s: float, map_pack: object = None) -> list[Decoded]:
        self.asked.append(since_s)
        return []

    history = acknowledged

    def eras(self, conn: object) -> list[object]:
        return []


def test_the_redo_reaches_back_twice_second_delete_ms_before_the_last_acknowledgement() -> None:
    """A second delete may wait second_delete_ms past its time while a backlog drains
    (runner.py): one its predecessor owed at its death can be up to twice that old."""
    history = LastAcknowledged(ago=2.0)
    nothing = lambda works: pytest.fail(f"nothing to sweep: {works}")  # noqa: E731
    redo_owed(None, history, Mapper({}), Recorder(), 0.3, sweep_later=nothing)  # type: ignore[arg-type]
    assert history.asked == [pytest.approx(2.0 + 2 * 0.3 + MARGIN_S)]


def test_a_next_listener_redoes_the_rows_processed_up_to_its_predecessors_position(
    env: Env,
) -> None:
    """listener_state_v1 says what was processed: every transaction visible in its
    snapshot, and those of the window it was reading up to its (xid, id). Those rows are
    redone, from the saved snapshot at the window's start on; the rows after are not
    (history_trigger.sql, what `replay` reads, takes them all)."""
    setup_users(env, rows=7)  # (written before install: no queue rows)
    snapshots = []
    with env.connect() as conn:
        for i in range(1, 8):
            conn.execute("UPDATE users SET email = 'x' || id WHERE id = %s", [i])
            row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
            assert row is not None
            snapshots.append(row[0])  # after the i-th transaction committed
        rows = conn.execute(
            "SELECT id, xid::text FROM cdc_invalidator.queue_v1 ORDER BY xid, id"
        ).fetchall()
        assert len(rows) == 7
        ids = [r[0] for r in rows]
        # Processed: the first two (in the snapshot), then the window up to the fourth.
        conn.execute(
            "UPDATE cdc_invalidator.listener_state_v1 SET snapshot = %s::pg_snapshot,"
            " window_end = %s::pg_snapshot, after_xid = %s::xid8, after_id = %s",
            [snapshots[1], snapshots[5], rows[3][1], rows[3][0]],
        )
        conn.execute("DELETE FROM cdc_invalidator.progress_v1")

        def read(query: Q) -> list[int]:
            return [r[0] for r in conn.execute(query.sql, {"seconds": 60}).fetchall()]

        # No saved snapshot as old as the window: from the first row on.
        assert read(Q.REDO_TRIGGER) == ids[:4]
        assert read(Q.HISTORY_TRIGGER) == ids
        # The first transaction's keys deleted before the window: not owed.
        conn.execute(
            "INSERT INTO cdc_invalidator.progress_v1 (at, snapshot)"
            " VALUES (now() - interval '1 hour', %s::pg_snapshot)",
            [snapshots[0]],
        )
        assert read(Q.REDO_TRIGGER) == ids[1:4]
        # Between windows (no window open): the snapshot alone.
        conn.execute(
            "UPDATE cdc_invalidator.listener_state_v1"
            " SET window_end = NULL, after_xid = NULL, after_id = NULL"
        )
        assert read(Q.REDO_TRIGGER) == ids[1:2]
