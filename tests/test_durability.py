"""What Redis's servers said at each identity check, and how far back a replay reaches
when they change (redis_guard/durability.py): pure, from ServerStates (but the last
test, of a real Redis's). Against real servers: tests/test_replay.py (a snapshot that
failed, a restart before the next one)."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from cdc_invalidator.redis_guard.durability import Durability
from cdc_invalidator.redis_guard.window import MARGIN_S, UNKNOWN_PERSISTENCE_S
from cdc_invalidator.sink import ServerState, redis_sink
from tests.support.servers import RedisServer

T0 = 1_800_000_000.0  # unix time of the checks below: T0 + their monotonic time

RDB = ServerState(
    run_id="a",
    master=True,
    replid="ra",
    offset=0,
    replid2="0" * 40,
    second_offset=-1,
    aof=False,
    aof_ok=True,
    saved_at=T0,
    unsaved=0,
    saves=1,
    loaded_keys=0,
)


def observe(d: Durability, state: ServerState, at: float) -> None:
    d.observe([state], at, T0 + at)


def reach(d: Durability, state: ServerState, at: float) -> float:
    """The farthest reach of the change to `state` at `at`, less the margin (0: none)."""
    reaches = d.reaches([state], at, T0 + at)
    return max((r.since_s for r in reaches), default=MARGIN_S) - MARGIN_S


def test_a_snapshot_that_failed_reaches_back_to_the_last_one_that_did() -> None:
    d = Durability()
    observe(d, RDB, 0)  # saved at T0, nothing since
    observe(d, replace(RDB, unsaved=5), 10)  # our deletes, and every snapshot since fails
    observe(d, replace(RDB, unsaved=9), 30)
    restarted = replace(RDB, run_id="b", saved_at=T0 + 31, unsaved=0, saves=0, loaded_keys=7)
    assert reach(d, restarted, 31) == pytest.approx(31)


def test_a_restart_before_the_next_snapshot_carries_the_dump_it_loaded() -> None:
    d = Durability()
    observe(d, replace(RDB, unsaved=5), 10)
    first = replace(RDB, run_id="b", saved_at=T0 + 20, unsaved=0, saves=0, loaded_keys=7)
    assert reach(d, first, 20) == pytest.approx(20)
    observe(d, first, 20)
    # The replay's deletes; no snapshot yet (lastsave is its start, not a save).
    observe(d, replace(first, unsaved=40), 25)
    second = replace(first, run_id="c", saved_at=T0 + 30, unsaved=0)
    assert reach(d, second, 30) == pytest.approx(30), "the dump of T0 came back again"
    # Once the server saved, its own snapshot is what a restart loads.
    observe(d, second, 30)
    observe(d, replace(second, saves=1, saved_at=T0 + 40, unsaved=3), 45)
    assert reach(d, replace(second, run_id="d", saves=0), 50) == pytest.approx(10)


def test_a_server_that_loaded_nothing_or_kept_everything_reaches_no_further() -> None:
    d = Durability()
    observe(d, replace(RDB, unsaved=5), 10)
    assert reach(d, replace(RDB, run_id="b", loaded_keys=0, saves=0), 20) == 0
    d = Durability()
    observe(d, replace(RDB, aof=True, unsaved=5), 10)  # AOF writing: durable at each check
    assert reach(d, replace(RDB, run_id="b", aof=True, loaded_keys=9), 12) == pytest.approx(2)


def test_an_aof_whose_writes_fail_reaches_back_to_the_last_check_they_did() -> None:
    d = Durability()
    observe(d, replace(RDB, aof=True, unsaved=5), 10)
    observe(d, replace(RDB, aof=True, aof_ok=False, unsaved=9), 20)
    assert reach(d, replace(RDB, run_id="b", aof=True, loaded_keys=9), 30) == pytest.approx(20)


def test_a_redis_that_does_not_count_its_saves_is_left_to_the_settings() -> None:
    d = Durability()
    observe(d, replace(RDB, unsaved=5, saves=None), 10)
    assert reach(d, replace(RDB, run_id="b", saves=None, loaded_keys=None), 20) == 0


def test_a_promoted_replica_reaches_back_to_the_last_offset_it_holds() -> None:
    d = Durability()
    for at, offset in ((0, 100), (10, 100), (11, 300), (20, 500)):
        observe(d, replace(RDB, offset=offset), at)
    promoted = replace(RDB, run_id="r", replid="rr", replid2="ra", second_offset=101)
    # Writes past offset 100 began after the check at 10: 25 - 10.
    assert reach(d, promoted, 25) == pytest.approx(15)
    in_sync = replace(promoted, second_offset=501)
    assert reach(d, in_sync, 25) == pytest.approx(5)
    # It lagged from before the oldest offset kept: an hour at least.
    behind = replace(promoted, second_offset=50)
    assert reach(d, behind, 25) == pytest.approx(UNKNOWN_PERSISTENCE_S - MARGIN_S)
    # A history no check saw (a replica restarted from its AOF forgets its master's
    # replid): how far it lags is unknown, an hour.
    unplaced = replace(promoted, replid2="other", second_offset=1)
    assert reach(d, unplaced, 25) == pytest.approx(UNKNOWN_PERSISTENCE_S - MARGIN_S)
    # A server seen before the change, promoted before the listener saw it: not this
    # change's doing, the settings' window stands.
    other = replace(RDB, run_id="o", replid="ro")
    d = Durability()
    d.observe([unplaced, other], 25, T0 + 25)
    # (the other primary of a cluster restarted: it loaded no keys, no reach of its own)
    restarted = replace(other, run_id="n", replid="rn", saves=0, loaded_keys=0)
    assert d.reaches([unplaced, restarted], 26, T0 + 26) == []


def test_a_restarted_master_that_had_a_replica_reaches_back_to_its_dump() -> None:
    """A master with a replica saves its replid and offset in its dump, and once
    restarted reports them as a promoted replica does (master_replid2,
    second_repl_offset): its dump is what it loaded all the same."""
    d = Durability()
    observe(d, replace(RDB, offset=100), 0)
    observe(d, replace(RDB, offset=900, unsaved=5), 7200)  # 2 h of failing snapshots
    restarted = replace(
        RDB, run_id="b", replid="rb", replid2="ra", second_offset=101, saves=0, loaded_keys=7
    )
    assert reach(d, restarted, 7210) == pytest.approx(7210)


def test_a_saves_time_is_put_on_the_listeners_clock(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rdb_last_save_time is Redis's clock, and the reach is counted on the listener's:
    a listener 30 s behind Redis (another host) took a dump saved 10 s ago for one
    saved 20 s in its future, and replayed 25 s too little (a review, reproduced with
    libfaketime: the keys stayed stale). The save's age is read on Redis's clock."""
    client = own_redis.client()
    client.save()
    behind = SimpleNamespace(time=lambda: time.time() - 30)  # the listener's clock
    monkeypatch.setattr(redis_sink, "time", behind)
    saved_at = redis_sink.server_state(client).saved_at
    assert abs(saved_at - behind.time()) < 2, (saved_at, behind.time())
