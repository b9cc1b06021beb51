"""The runner's loop against in-memory fakes: no servers.

FakeSource hands out scripted batches and records what the runner does with it
(batches taken, acknowledgements, maintain() and wait() calls); FakeSink records the
deletes and raises what it is told to. The runner module's clock is replaced: sleeps
and waits move it on instead of passing time, so linger, back-off and second deletes
are checked by the delays the runner asks for, never by measuring.

The trigger source's NOTIFY-or-poll policy is tested on its own (WakeupPolicy).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import pytest
import redis

from cdc_invalidator import runner as runner_module
from cdc_invalidator import second_deletes as second_deletes_module
from cdc_invalidator.capture.errors import Fatal, Standby
from cdc_invalidator.capture.holds import Hold
from cdc_invalidator.capture.trigger_queue import (
    UNLISTEN_AT,
    Progress,
    Retention,
    Snapshot,
    TriggerQueue,
    WakeupPolicy,
)
from cdc_invalidator.events import ChangeEvent, Op, Origin, TableName
from cdc_invalidator.events import StandInKind as Kind
from cdc_invalidator.mapping import KeyTemplate, Mapper, Routed
from cdc_invalidator.mapping.mapper import StoodIn
from cdc_invalidator.metrics import Metrics
from cdc_invalidator.redis_guard.watch import RedisWatch
from cdc_invalidator.replay import ReplayResult
from cdc_invalidator.runner import (
    BUSY_BATCH,
    HEALTHY_CONNECTION_S,
    ConfigurationChanged,
    Runner,
    RunnerConfig,
    Source,
)
from cdc_invalidator.shutdown import Stopper
from cdc_invalidator.sweeper import SweepLater
from tests.support.logs import captured_logs
from tests.support.runner_fakes import RecordingSink

USERS = TableName("public", "users")
T0 = 1000.0
# A runner that loops this often without the test ending it is stuck: fail, not hang.
MAX_TURNS = 10_000

Entry = tuple[object, ...]


class Clock:
    """Stands in for the runner module's `time`: only monotonic() is read there."""

    def __init__(self) -> None:
        self.now = T0
        self.stop_at = float("inf")
        self.stopper: Stopper | None = None

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        if self.now >= self.stop_at and self.stopper is not None:
            self.stopper.stop()


class FakeStopper(Stopper):
    """A real stop flag and pipe; sleep() moves the clock on and records the delay."""

    def __init__(self, clock: Clock, log: list[Entry]) -> None:
        super().__init__()
        self._clock = clock
        self._log = log
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self._log.append(("sleep", seconds))
        self._clock.advance(seconds)
        return self.stopped


@dataclass(slots=True)
class FakeBatch:
    ids: list[int]
    ages_s: list[float] = field(default_factory=list)
    read_at: float = 0.0
    dead: dict[int, str] = field(default_factory=dict)
    oldest_s: float | None = None
    visible_at: float | None = None
    confirm_later: bool = False  # (runner.Pipelined)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def events(self) -> list[ChangeEvent]:
        return [ChangeEvent(USERS, Op.INSERT, None, {"id": str(i)}, i) for i in self.ids]

    def dead_letter(self, position: int, error: str) -> None:
        self.dead[position] = error

    def origins(self) -> list[Origin]:
        return [Origin(None, "") for _ in self.ids]

    def hold(self) -> Hold:
        return Hold()  # (these batches' inserts have keys only, never a sweep)


@dataclass(slots=True)
class FakeEarlyBatch(FakeBatch):
    """An Early batch (runner.early_of): deleted ahead of the batch that acknowledges it."""

    def leave(self) -> None:
        raise AssertionError("these batches' inserts are never left to the queue read")


@dataclass(slots=True)
class Arrives:
    """A batch of these user ids, there to be read from clock time `at` on."""

    ids: list[int]
    at: float = T0
    ages_s: list[float] = field(default_factory=list)
    # The oldest transaction's age, if not the oldest of ages_s (one whose commit is in
    # a later batch).
    oldest_s: float | None = None
    visible_at: float | None = None  # when its changes were visible (clock time)
    confirm_later: bool = False  # a streamed transaction's share before its last
    early: bool = False  # NOTIFY payloads' changes: an Early batch, which acknowledges nothing


@dataclass
class World:
    clock: Clock
    stopper: FakeStopper
    log: list[Entry]

    def kinds(self) -> list[object]:
        return [entry[0] for entry in self.log]

    def entries(self, kind: str) -> list[Entry]:
        return [entry for entry in self.log if entry[0] == kind]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    clock = Clock()
    log: list[Entry] = []
    stopper = FakeStopper(clock, log)
    clock.stopper = stopper
    # The runner and the second deletes it holds read the same (fake) clock.
    monkeypatch.setattr(runner_module, "time", clock)
    monkeypatch.setattr(second_deletes_module, "time", clock)
    yield World(clock, stopper, log)
    stopper.close()


class FakeSource:
    """Scripted batches; an exception in the script is raised by batch(). A batch left
    by an exception comes again, as from both real sources. When the script is done,
    the first wait() stops the runner (with stop_when_done; else the clock's stop_at
    does)."""

    def __init__(
        self, world: World, script: list[Arrives | BaseException], stop_when_done: bool = True
    ) -> None:
        self._world = world
        self._script: deque[Arrives | BaseException] = deque(script)
        self._pending: FakeBatch | None = None
        self._stop_when_done = stop_when_done
        self.turns = 0

    @contextmanager
    def batch(self, limit: int) -> Iterator[FakeBatch]:
        self.turns += 1
        if self.turns > MAX_TURNS:
            raise AssertionError("the runner loops without end")
        clock, log = self._world.clock, self._world.log
        if self._pending is None:
            item = self._script[0] if self._script else None
            if isinstance(item, BaseException):
                self._script.popleft()
                raise item
            if item is not None and item.at <= clock.now:
                self._script.popleft()
                assert len(item.ids) <= limit, "a script batch larger than batch_size"
                oldest_s = item.oldest_s
                if oldest_s is None:
                    oldest_s = max(item.ages_s, default=None)
                self._pending = (FakeEarlyBatch if item.early else FakeBatch)(
                    item.ids,
                    item.ages_s,
                    clock.now,
                    oldest_s=oldest_s,
                    visible_at=item.visible_at,
                    confirm_later=item.confirm_later,
                )
            else:
                self._pending = FakeBatch([], read_at=clock.now)
        batch = self._pending
        log.append(("batch", batch.ids))
        yield batch
        self._pending = None
        log.append(("early done" if isinstance(batch, FakeEarlyBatch) else "ack", batch.ids))

    def maintain(self) -> None:
        self._world.log.append(("maintain",))

    def settle(self) -> None:
        self._world.log.append(("settle",))

    def wait(self, timeout_s: float, wakeup_fd: int | None = None) -> None:
        world = self._world
        world.log.append(("wait", timeout_s))
        assert wakeup_fd == world.stopper.fileno(), "a wait that shutdown cannot cut short"
        if not self._script and self._stop_when_done:
            world.stopper.stop()
            return
        ahead = self._script[0] if self._script else None
        arrives = ahead.at if isinstance(ahead, Arrives) else float("inf")
        world.clock.advance(min(timeout_s, arrives - world.clock.now))

    def close(self) -> None:
        self._world.log.append(("close",))


class Connector:
    """connect(): raises the next scripted failure, else hands out the source."""

    def __init__(self, world: World, source: FakeSource, failures: list[BaseException]) -> None:
        self._world = world
        self._source = source
        self._failures = deque(failures)

    def __call__(self) -> Source:
        self._world.log.append(("connect",))
        if self._failures:
            raise self._failures.popleft()
        return self._source


class FakeSink(RecordingSink):
    """Records every delete (`deletes`), the clock then (`at`) and a log entry.
    `failures` scripts the first calls: an exception to raise, or None to go through."""

    def __init__(
        self,
        world: World,
        failures: list[Exception | None] | None = None,
        on_delete: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._world = world
        self._failures = deque(failures or [])
        self._on_delete = on_delete
        self.attempts = 0
        self.at: list[float] = []  # the clock at each of `deletes`

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        self.attempts += 1
        if self._on_delete is not None:
            self._on_delete()
        failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            raise failure
        deleted = super().delete_routed(works)
        self.at.append(self._world.clock.now)
        self._world.log.append(("delete later" if later else "delete", self.deletes[-1]))
        return deleted


class FakeWatch(RedisWatch):
    """The identity check: records whether it was forced; raises the scripted errors
    first (Redis does not answer), then answers: the same server (no replay), or with
    `replays` another one each time (the replay settles the history, as RedisWatch's)."""

    def __init__(
        self, world: World, failures: list[Exception] | None = None, replays: bool = False
    ) -> None:
        self._world = world  # no sink, mapper or database: RedisWatch's __init__ not called
        self._failures = deque(failures or [])
        self._replays = replays

    def check(
        self,
        *,
        sweep_later: SweepLater,
        force: bool = False,
        settle: Callable[[], None] = lambda: None,
        before_rendering: Callable[[], None] = lambda: None,
    ) -> ReplayResult | None:
        self._world.log.append(("check", force))
        if self._failures:
            raise self._failures.popleft()
        if not self._replays:
            return None
        settle()
        before_rendering()
        self._world.log.append(("replay",))
        return ReplayResult(events=0, keys=0, existed=0, skipped=0, seconds=0.0)


def make_runner(  # noqa: PLR0913 - the parts past `sink` are keyword-only
    world: World,
    source: FakeSource,
    sink: FakeSink,
    *,
    connect_failures: list[BaseException] | None = None,
    watch: RedisWatch | None = None,
    mapping_changed: Callable[[], bool] | None = None,
    **config: Any,
) -> Runner:
    defaults: dict[str, Any] = {
        "batch_size": 100,
        "poll_interval_s": 1.0,
        "retry_initial_s": 1.0,
        "retry_max_s": 100.0,
        "linger_s": 0.05,
    }
    cfg = RunnerConfig(**{**defaults, **config})
    return Runner(
        connect=Connector(world, source, connect_failures or []),
        mapper=Mapper({USERS: [KeyTemplate.parse("user:{id}")]}),
        sink=sink,
        config=cfg,
        stopper=world.stopper,
        watch=watch,
        mapping_changed=mapping_changed,
    )


def keys(*ids: int) -> list[str]:
    return sorted(f"user:{i}" for i in ids)


def sample(r: Runner, name: str, store: str) -> float | None:
    return r.metrics.registry.get_sample_value(f"cdc_invalidator_{name}", {"store": store})


# --- the quiet path and linger ------------------------------------------------------------


def test_one_change_at_a_time_is_never_delayed(world: World) -> None:
    """A batch of one: maintain(), then wait() for the next change, no linger."""
    source = FakeSource(world, [Arrives([1]), Arrives([2], at=T0 + 2)])
    make_runner(world, source, FakeSink(world), poll_interval_s=10.0).run()
    assert world.stopper.sleeps == []
    turns = [e for e in world.log if e[0] in ("batch", "ack", "maintain", "wait", "close")]
    assert turns == [
        ("batch", [1]),
        ("ack", [1]),
        ("maintain",),
        ("wait", 10.0),  # woken when the next change arrives
        ("batch", [2]),
        ("ack", [2]),
        ("maintain",),
        ("wait", 10.0),  # the script is done: this wait stops the runner
        ("close",),
    ]


def test_an_idle_listener_polls(world: World) -> None:
    source = FakeSource(world, [Arrives([1], at=T0 + 2.5)])
    make_runner(world, source, FakeSink(world), poll_interval_s=1.0).run()
    assert [e for e in world.log if e[0] in ("batch", "wait")] == [
        ("batch", []),
        ("wait", 1.0),
        ("batch", []),
        ("wait", 1.0),
        ("batch", []),
        ("wait", 1.0),  # cut short by the change
        ("batch", [1]),
        ("wait", 1.0),
    ]


def test_under_load_the_next_batch_lingers_from_the_start_of_the_last(world: World) -> None:
    """More than one change, fewer than batch_size: sleep until the linger after the
    batch started (a slow delete shortens it), no wait(): the whole linger_s once a batch
    holds BUSY_BATCH changes, a share of it for fewer (two changes: a seventh); a full
    batch goes on at once; one change alone waits again."""

    def slow_redis() -> None:
        world.clock.advance(0.005)

    busy = list(range(10, 10 + BUSY_BATCH))
    source = FakeSource(
        world,
        [Arrives(list(range(1, 10))), Arrives(busy), Arrives([30, 31]), Arrives([32])],
    )
    sink = FakeSink(world, on_delete=slow_redis)
    make_runner(world, source, sink, batch_size=9, linger_s=0.07).run()
    after = [e for e in world.log if e[0] in ("ack", "sleep", "wait")]
    assert after[0] == ("ack", list(range(1, 10)))  # full: the next batch at once
    assert after[1] == ("ack", busy)
    assert after[2][0] == "sleep"
    assert after[3] == ("ack", [30, 31])
    assert after[4][0] == "sleep"
    assert world.stopper.sleeps == [
        pytest.approx(0.07 - 0.005),
        pytest.approx(0.07 / (BUSY_BATCH - 1) - 0.005),
    ]
    assert after[5:] == [("ack", [32]), ("wait", 1.0)]


def test_maintain_runs_on_every_turn(world: World) -> None:
    """Busy, idle, full, or after a Redis error: housekeeping is the source's, every turn."""
    source = FakeSource(world, [Arrives([1, 2, 3]), Arrives([4, 5]), Arrives([6], at=T0 + 2)])
    sink = FakeSink(world, failures=[redis.ConnectionError("down")])
    make_runner(world, source, sink, batch_size=3).run()
    # [1, 2, 3] (refused, then again), [4, 5], then idle until [6].
    assert [e[1] for e in world.entries("batch")][:4] == [[1, 2, 3], [1, 2, 3], [4, 5], []]
    assert world.entries("batch")[-1] == ("batch", [6])
    assert world.kinds().count("maintain") == source.turns


# --- the trigger source's NOTIFY-or-poll policy -------------------------------------------


def test_wakeup_policy_unlistens_when_clearly_busy_and_listens_again_when_quiet() -> None:
    policy = WakeupPolicy()
    limit = 5000
    assert policy.listening
    # Quiet, a few at once, or a full batch (more waiting): NOTIFY stays on.
    for size in (0, 1, 2, UNLISTEN_AT - 1, limit):
        assert policy.after_batch(size, limit) is None, size
        assert policy.listening
    assert policy.after_batch(UNLISTEN_AT, limit) is False  # UNLISTEN
    assert not policy.listening
    assert not policy.look_again
    # Still busy, or only somewhat (the runner lingers and polls): no switch back and
    # forth, each LISTEN costs the backend a walk over the NOTIFY queue.
    for size in (limit, 100, 2, UNLISTEN_AT):
        assert policy.after_batch(size, limit) is None, size
        assert not policy.listening
    # Quiet again: LISTEN, then look once more before waiting.
    assert policy.after_batch(1, limit) is True
    assert policy.listening
    assert policy.look_again
    # The look is that next batch; whatever it finds, no further switch.
    assert policy.after_batch(0, limit) is None
    assert not policy.look_again
    assert policy.listening


@pytest.mark.parametrize("quiet", [0, 1])
def test_wakeup_policy_listens_again_on_an_empty_or_single_batch(quiet: int) -> None:
    policy = WakeupPolicy()
    assert policy.after_batch(50, 100) is False
    assert policy.after_batch(quiet, 100) is True
    assert policy.look_again


def test_wakeup_policy_never_unlistens_when_batches_are_too_small_to_tell() -> None:
    """With batch_size at most UNLISTEN_AT, a batch that large is a full one."""
    policy = WakeupPolicy()
    for _ in range(3):
        assert policy.after_batch(UNLISTEN_AT, UNLISTEN_AT) is None
    assert policy.listening


class NoConnection:
    """Any use fails the test: a wait() that should return at once must not touch it."""

    class _PGconn:
        notify_handler: object = None  # set once, by the queue's constructor

        def parameter_status(self, name: bytes) -> bytes | None:  # read once, likewise
            return b"UTF8" if name == b"client_encoding" else None

    pgconn = _PGconn()

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the connection was used ({name})")


def idle_queue() -> TriggerQueue:
    conn = cast("psycopg.Connection[Any]", NoConnection())
    progress = Progress(Snapshot.parse("10:10:"))
    progress.saved = progress.state()  # nothing to save: no reason to return early
    return TriggerQueue(conn, progress, 1.0, Retention(0.0))


def test_trigger_wait_returns_at_once_for_the_look_after_listen_again() -> None:
    queue = idle_queue()
    queue.wait(3600.0)  # a new session's first look at the queue is at once (_prepare)
    queue._woken = False  # that look
    with pytest.raises(AssertionError, match="connection was used"):
        queue.wait(0.0)  # an ordinary wait reads the connection: the fake can tell
    policy = queue._wakeup
    assert policy.after_batch(50, 100) is False
    assert policy.after_batch(1, 100) is True
    queue.wait(3600.0)  # returns at once: the runner looks once more
    policy.after_batch(0, 100)  # that look
    with pytest.raises(AssertionError, match="connection was used"):
        queue.wait(0.0)


class BusyLockConnection:
    """Answers every query (busy.sql's try) with `taken`, counting them."""

    pgconn = NoConnection._PGconn()

    def __init__(self, taken: bool) -> None:
        self.taken = taken
        self.queries = 0

    def execute(self, _query: object) -> BusyLockConnection:
        self.queries += 1
        return self

    def fetchone(self) -> tuple[bool]:
        return (self.taken,)


@pytest.mark.parametrize("taken", [True, False])
def test_trigger_busy_lock_is_tried_again_at_once_after_a_take_not_after_a_failure(
    taken: bool,
) -> None:
    """A failed try (a writer testing the lock that instant) is not repeated within
    BUSY_RETRY_S; a lock taken, let go (quiet) and wanted again (busy) is tried at once:
    until it is held, every writer's commit sends the wake-up."""
    conn = BusyLockConnection(taken)
    progress = Progress(Snapshot.parse("10:10:"))
    queue = TriggerQueue(cast("psycopg.Connection[Any]", conn), progress, 1.0, Retention(0.0))
    queue._take_busy()
    assert queue._busy is taken
    queue._busy = False  # quiet again (quiet.sql), then busy again at once
    queue._take_busy()
    assert conn.queries == (2 if taken else 1)


# --- Redis: refused writes, back-off ------------------------------------------------------


def test_redis_refusing_writes_is_unavailable_until_a_batch_goes_through(world: World) -> None:
    """It answers INFO (the identity check) but refuses the deletes (READONLY): still
    unavailable, however often it answers, until a batch goes through."""
    seen: list[bool | None] = []
    refused = redis.ReadOnlyError("READONLY You can't write against a read only replica.")
    source = FakeSource(world, [Arrives([1])])
    sink = FakeSink(
        world, failures=[refused, refused], on_delete=lambda: seen.append(r.redis.available)
    )
    r = make_runner(world, source, sink, watch=FakeWatch(world))
    r.run()
    # What each attempt saw: Redis had answered INFO before each (forced: after an
    # outage), then the periodic look after the batch that went through.
    assert seen == [True, False, False]
    assert [e[1] for e in world.entries("check")] == [True, True, True, False]
    assert r.redis.available
    # One outage, one way back, however many tries.
    assert sample(r, "reconnects_total", "redis") == 1
    assert sample(r, "errors_total", "redis") == 2


def test_redis_that_answers_again_is_available_before_the_next_batch(world: World) -> None:
    """Gone (the identity check fails), then answering: available at once."""
    seen: list[bool | None] = []
    gone = redis.ConnectionError("Connection refused")
    source = FakeSource(world, [Arrives([1])])
    sink = FakeSink(world, on_delete=lambda: seen.append(r.redis.available))
    r = make_runner(world, source, sink, watch=FakeWatch(world, failures=[gone, gone]))
    r.run()
    assert seen == [True]
    assert [e[1] for e in world.entries("check")] == [True, True, True, False]
    assert sample(r, "reconnects_total", "redis") == 1
    assert sample(r, "errors_total", "redis") == 2


def test_the_periodic_look_at_redis_comes_after_a_batchs_deletes(world: World) -> None:
    """Asked before the first batch (forced), then after each batch's deletes, never
    between a change's read and its delete: the INFO round trip is off that path."""
    source = FakeSource(world, [Arrives([1]), Arrives([2])])
    make_runner(world, source, FakeSink(world), watch=FakeWatch(world)).run()
    seen = [e[0] for e in world.log if e[0] in ("check", "batch", "delete", "wait")]
    # (the wait is where a change wakes the listener: no look between it and the delete)
    assert seen[:8] == ["check", "batch", "delete", "check", "wait", "batch", "delete", "check"]
    assert [e[1] for e in world.entries("check")][:3] == [True, False, False]


def test_a_replay_settles_the_sources_history_first(world: World) -> None:
    """The watch is handed the connected source's settle: logical mode's history of the
    batches already acknowledged is written before a replay reads it."""
    source = FakeSource(world, [Arrives([1])])
    make_runner(world, source, FakeSink(world), watch=FakeWatch(world, replays=True)).run()
    kinds = world.kinds()
    assert kinds[kinds.index("check") + 1 : kinds.index("check") + 3] == ["settle", "replay"]


def test_redis_errors_back_off_and_the_delay_resets_after_a_batch_goes_through(
    world: World,
) -> None:
    down = redis.ConnectionError("Connection refused")
    source = FakeSource(world, [Arrives([1]), Arrives([2], at=T0 + 100)])
    # Three failures for the first batch, one for the second.
    sink = FakeSink(world, failures=[down, down, down, None, down])
    make_runner(world, source, sink, retry_initial_s=1.0, retry_max_s=100.0).run()
    assert len(world.stopper.sleeps) == 4
    first, second, third, after_success = world.stopper.sleeps
    assert first < second < third  # doubling, ±10 % jitter
    assert after_success < second  # back to the first delay
    assert [e[1] for e in world.entries("ack") if e[1]] == [[1], [2]]


# --- acknowledgement ------------------------------------------------------------------------


def test_a_batch_is_acknowledged_only_after_redis_confirmed(world: World) -> None:
    """A sink error leaves the batch unacknowledged; the same batch comes again."""
    source = FakeSource(world, [Arrives([1, 2])])
    sink = FakeSink(world, failures=[redis.TimeoutError("Timeout reading from socket")])
    make_runner(world, source, sink).run()
    handled = [e[:2] for e in world.log if e[0] in ("batch", "delete", "ack") and e[1]]
    assert handled == [
        ("batch", [1, 2]),  # the delete failed: no ack
        ("batch", [1, 2]),
        ("delete", keys(1, 2)),
        ("ack", [1, 2]),
    ]


def test_a_share_confirmed_later_is_confirmed_before_any_other_batch_acknowledges(
    world: World,
) -> None:
    """A streamed transaction's shares before its last leave Redis's confirmation to the
    next delete; the last share confirms it before it acknowledges the commit, even when
    it holds no change of its own (the shares ended exactly at a batch's limit)."""
    source = FakeSource(
        world,
        [
            Arrives([1, 2], confirm_later=True),
            Arrives([3], confirm_later=True),
            Arrives([]),  # the last share: nothing left, only the commit to acknowledge
            Arrives([4]),
        ],
    )
    sink = FakeSink(world)
    make_runner(world, source, sink).run()
    handled = [e[:2] for e in world.log if e[0] in ("batch", "delete", "delete later", "ack")]
    assert handled[:9] == [
        ("batch", [1, 2]),
        ("delete later", keys(1, 2)),
        ("ack", [1, 2]),
        ("batch", [3]),
        ("delete later", keys(3)),
        ("ack", [3]),
        ("batch", []),
        ("delete", []),  # what the shares before left to confirm: before the ack
        ("ack", []),
    ]
    assert ("delete", keys(4)) in handled
    assert handled.count(("delete", [])) == 1  # confirmed once, not on every batch after


class OwingSink(FakeSink):
    """Counts as a RedisSink does with `later`: a share's keys are counted by the call
    that reads their replies."""

    owed = 0

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        existed = super().delete_routed(works, later)
        if later:
            self.owed += existed
            return 0
        existed, self.owed = existed + self.owed, 0
        return existed


def test_the_keys_of_shares_confirmed_later_count_as_keys_deleted(world: World) -> None:
    script: list[Arrives | BaseException] = [
        Arrives([1, 2], confirm_later=True),
        Arrives([3], confirm_later=True),
        Arrives([]),
    ]
    runner = make_runner(world, FakeSource(world, script), OwingSink(world))
    runner.run()
    assert runner.keys_deleted == 3


def test_shares_confirmed_later_are_confirmed_before_second_deletes_run(world: World) -> None:
    """A second delete's reply must be its own: what the shares before it owe is read
    first (and counted as first deletes)."""
    script: list[Arrives | BaseException] = [
        Arrives([1], visible_at=T0),
        Arrives([2, 3], at=T0 + 0.1, confirm_later=True),
        Arrives([4], at=T0 + 0.1, confirm_later=True),
        Arrives([], at=T0 + 0.1),
    ]

    def slow_redis() -> None:
        world.clock.advance(0.15)  # key 1's second delete falls due between the shares

    sink = OwingSink(world, on_delete=slow_redis)
    runner = make_runner(world, FakeSource(world, script), sink, second_delete_s=0.3)
    runner.run()
    deletes = [e[:2] for e in world.log if e[0] in ("delete", "delete later")]
    # The second delete of key 1 came due while the shares were handed out.
    again = deletes.index(("delete", keys(1)), 1)
    assert ("delete", []) in deletes[:again], "the owed replies read before it"
    assert runner.keys_deleted == 4
    assert runner.keys_deleted_again == 4  # (each key once more: the shares at the stop)


def test_lag_and_behind_come_from_the_batch_ages(world: World) -> None:
    """ages_s are as of read_at: the runner adds the time since (here a slow delete)."""

    def slow_redis() -> None:
        world.clock.advance(0.25)
        world.stopper.stop()  # before an empty batch says "caught up"

    source = FakeSource(world, [Arrives([1, 2], ages_s=[2.0, 0.5])])
    r = make_runner(world, source, FakeSink(world, on_delete=slow_redis))
    r.run()
    assert r.behind_s == pytest.approx(0.75)  # the newest transaction, 0.5 + 0.25
    registry = r.metrics.registry
    assert registry.get_sample_value("cdc_invalidator_commit_to_delete_seconds_count") == 2
    assert registry.get_sample_value("cdc_invalidator_commit_to_delete_seconds_sum") == (
        pytest.approx(2.25 + 0.75)
    )


def test_changes_the_source_holds_back_count_as_behind(world: World) -> None:
    """An empty batch with ages: changes the source read but holds back (logical mode:
    commits a synchronous standby has not let become visible), or a commit whose
    changes came before. Behind by the oldest, and more as it waits: /readyz said 0 s
    behind, ready, for as long as a standby held everything back (a review)."""
    source = FakeSource(world, [Arrives([], ages_s=[2.0])])
    r = make_runner(world, source, FakeSink(world))
    r.run()
    assert r.behind_s == pytest.approx(2.0)


def test_a_held_batch_is_behind_from_its_oldest_transaction_not_its_commits(
    world: World,
) -> None:
    """A batch of a transaction whose commit comes in a later batch (logical mode
    streams a large one in pieces) has no ages_s; held up by Redis, it is behind all
    the same."""
    seen = []

    def held_redis() -> None:
        world.clock.advance(1.0)
        seen.append(r.health(stall_s=60.0, max_lag_s=0.5))
        world.stopper.stop()

    source = FakeSource(world, [Arrives([1, 2], ages_s=[], oldest_s=0.2)])
    r = make_runner(world, source, FakeSink(world, on_delete=held_redis))
    r.redis.up()
    r.postgres.up()
    r.run()
    (health,) = seen
    assert health.ready is False
    assert health.detail["behind_s"] == pytest.approx(1.2)


# --- second deletes -----------------------------------------------------------------------


def test_second_deletes_fall_due_and_merge_within_10_ms(world: World) -> None:
    source = FakeSource(
        world,
        [Arrives([1]), Arrives([2], at=T0 + 0.005), Arrives([3], at=T0 + 0.1)],
        stop_when_done=False,
    )
    world.clock.stop_at = T0 + 60
    sink = FakeSink(world)
    make_runner(world, source, sink, second_delete_s=30.0, poll_interval_s=7.0).run()
    assert sink.deletes == [keys(1), keys(2), keys(3), keys(1, 2), keys(3)]
    at = sink.at
    # Due second_delete_s after each first delete: the wait ends in time for them.
    assert at[3] == pytest.approx(at[0] + 30, abs=1e-6)
    assert at[4] == pytest.approx(at[2] + 30, abs=1e-6)


def test_second_deletes_count_from_when_the_changes_were_visible(world: World) -> None:
    """A reader's stale SET lands at most second_delete_s after the change was visible:
    the second delete is due then, and owed not at all by a batch deleted later (a
    backlog drained long after it was written)."""
    source = FakeSource(
        world,
        [
            Arrives([1], at=T0 + 10, visible_at=T0),  # visible 10 s ago: owes none
            Arrives([2], at=T0 + 20, visible_at=T0 + 19.5),  # due at T0 + 19.5 + 2
            Arrives([3], at=T0 + 30),  # unknown: due 2 s after its first delete
        ],
        stop_when_done=False,
    )
    world.clock.stop_at = T0 + 60
    sink = FakeSink(world)
    r = make_runner(world, source, sink, second_delete_s=2.0, poll_interval_s=7.0)
    r.run()
    assert sink.deletes == [keys(1), keys(2), keys(2), keys(3), keys(3)]
    at = sink.at
    assert at[2] == pytest.approx(T0 + 21.5, abs=1e-6)
    assert at[4] == pytest.approx(at[3] + 2, abs=1e-6)


def test_second_deletes_wait_while_a_backlog_drains(world: World) -> None:
    """Full batches (a backlog) go first: every key of them is stale until deleted. The
    second deletes owed wait until a batch that is not full is deleted, here 0.15 s past
    their time. (Times are kept off the boundaries, where float sums could tip them.)"""
    script: list[Arrives | BaseException] = [
        Arrives([1, 2], visible_at=T0),  # owed, due at T0 + 0.25
        Arrives([3, 4], visible_at=T0),  # owed, the same second delete
        Arrives([5, 6], visible_at=T0),  # deleted at T0 + 0.3: owes none
        Arrives([7]),  # read at T0 + 0.3, past the second delete's time
    ]

    def slow_redis() -> None:
        world.clock.advance(0.1)

    sink = FakeSink(world, on_delete=slow_redis)
    make_runner(world, FakeSource(world, script), sink, batch_size=2, second_delete_s=0.25).run()
    assert sink.deletes == [keys(1, 2), keys(3, 4), keys(5, 6), keys(7), keys(1, 2, 3, 4), keys(7)]
    # Sent at T0 + 0.4, after the backlog, done 0.1 s later.
    assert sink.at[4] == pytest.approx(T0 + 0.5)


def test_second_deletes_wait_for_a_backlog_second_delete_s_at_most(world: World) -> None:
    """A backlog that goes on does not hold them back for ever: second_delete_s past
    their time, they go between two full batches."""
    script: list[Arrives | BaseException] = [
        Arrives([2 * i + 1, 2 * i + 2], visible_at=T0) for i in range(8)
    ]

    def slow_redis() -> None:
        world.clock.advance(0.1)

    sink = FakeSink(world, on_delete=slow_redis)
    make_runner(world, FakeSource(world, script), sink, batch_size=2, second_delete_s=0.32).run()
    # The first three batches owe one (due at T0 + 0.32), held back until T0 + 0.64:
    # sent before the 8th batch, read at T0 + 0.7 (done 0.1 s later).
    assert sink.deletes[:7] == [keys(2 * i + 1, 2 * i + 2) for i in range(7)]
    assert sink.deletes[7] == keys(1, 2, 3, 4, 5, 6)
    assert sink.at[7] == pytest.approx(T0 + 0.8)
    assert sink.deletes[8:] == [keys(15, 16)]


def test_second_deletes_are_done_on_shutdown(world: World) -> None:
    source = FakeSource(world, [Arrives([1]), Arrives([2], at=T0 + 1)], stop_when_done=True)
    sink = FakeSink(world)
    make_runner(world, source, sink, second_delete_s=30.0).run()
    assert sink.deletes == [keys(1), keys(2), keys(1), keys(2)]
    assert world.clock.now < T0 + 30  # not due yet: done because the listener stops
    assert world.kinds()[-3:] == ["close", "delete", "delete"]


def test_second_deletes_on_shutdown_give_up_when_redis_is_gone(world: World) -> None:
    def redis_gone_at_shutdown() -> None:
        if world.stopper.stopped:
            raise redis.ConnectionError("Connection refused")

    source = FakeSource(world, [Arrives([1])])
    sink = FakeSink(world, on_delete=redis_gone_at_shutdown)
    make_runner(world, source, sink, second_delete_s=30.0).run()  # nothing raised
    assert sink.deletes == [keys(1)]
    assert sink.at == [T0]
    assert sink.attempts == 2


# --- PostgreSQL: back-off, standby, fatal ---------------------------------------------------


def test_postgres_errors_back_off_and_the_delay_resets_after_a_connection(world: World) -> None:
    down = psycopg.OperationalError("connection refused")
    # The connection, healthy for a while, breaks while reading a batch: reconnect, and
    # it comes.
    source = FakeSource(
        world, [Arrives([1]), Arrives([3], at=T0 + HEALTHY_CONNECTION_S + 10), down, Arrives([2])]
    )
    sink = FakeSink(world)
    r = make_runner(world, source, sink, connect_failures=[down, down, down])
    r.run()
    assert len(world.stopper.sleeps) == 4
    first, second, third, after_success = world.stopper.sleeps
    assert first < second < third
    assert after_success < second
    assert [e[1] for e in world.entries("ack") if e[1]] == [[1], [3], [2]]
    # The broken source was closed before reconnecting; one outage per way.
    assert world.kinds().count("close") == 2
    assert sample(r, "reconnects_total", "postgres") == 2
    assert r.postgres.available


def test_a_connection_that_fails_again_at_once_is_retried_later_and_later(
    world: World,
) -> None:
    """An error every turn meets (not the network: a statement PostgreSQL refuses) ends
    each connection right after it is made: the back-off goes on growing."""
    refused = psycopg.errors.ObjectNotInPrerequisiteState("cannot delete from table")
    source = FakeSource(world, [Arrives([1]), refused, refused, refused, Arrives([2])])
    make_runner(world, source, FakeSink(world)).run()
    first, second, third = world.stopper.sleeps[:3]
    assert first < second < third
    assert third > 3 * first


def test_a_standby_polls_for_its_turn(world: World) -> None:
    source = FakeSource(world, [Arrives([1])])
    sink = FakeSink(world)
    r = make_runner(
        world,
        source,
        sink,
        connect_failures=[Standby("lock held"), Standby("lock held")],
        poll_interval_s=2.5,
    )
    r.run()
    assert world.stopper.sleeps == [2.5, 2.5]  # no back-off
    assert world.entries("ack")[0] == ("ack", [1])
    assert r.postgres.available  # a standby's server answers
    assert sink.pings == 2, "and Redis, asked each poll"


def test_a_fatal_error_ends_the_run(world: World) -> None:
    source = FakeSource(world, [Arrives([1])])
    r = make_runner(world, source, FakeSink(world), connect_failures=[Fatal("run install")])
    with pytest.raises(Fatal, match="run install"):
        r.run()
    assert world.entries("batch") == []


# --- shutdown -------------------------------------------------------------------------------


def test_stop_finishes_the_batch_in_hand_then_closes_the_source(world: World) -> None:
    source = FakeSource(world, [Arrives([1, 2]), Arrives([3])])
    sink = FakeSink(world, on_delete=world.stopper.stop)  # SIGTERM while deleting
    make_runner(world, source, sink).run()
    assert [e[0:2] for e in world.log if e[0] not in ("maintain", "sleep")] == [
        ("connect",),
        ("batch", [1, 2]),
        ("delete", keys(1, 2)),
        ("ack", [1, 2]),
        ("close",),
    ]


def test_a_share_whose_delete_failed_comes_again_and_the_last_still_confirms_all(
    world: World,
) -> None:
    script: list[Arrives | BaseException] = [
        Arrives([1, 2], confirm_later=True),
        Arrives([3], confirm_later=True),
        Arrives([]),
    ]
    sink = OwingSink(world, failures=[None, redis.TimeoutError("Timeout reading from socket")])
    runner = make_runner(world, FakeSource(world, script), sink)
    runner.run()
    handled = [e[:2] for e in world.log if e[0] in ("batch", "delete", "delete later", "ack")]
    assert handled[:9] == [
        ("batch", [1, 2]),
        ("delete later", keys(1, 2)),
        ("ack", [1, 2]),
        ("batch", [3]),  # its delete failed: no ack, and it comes again
        ("batch", [3]),
        ("delete later", keys(3)),
        ("ack", [3]),
        ("batch", []),
        ("delete", []),
    ]
    assert handled[9] == ("ack", [])
    assert runner.keys_deleted == 3


# --- sweeps standing in for other changes -----------------------------------------------------


def test_stand_ins_are_counted_and_unrenderable_ones_logged_once_a_minute_or_for_news(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's sweep of a table for bulk statements counts each statement and logs
    each batch; for unrenderable changes it counts the sweep (whatever their number) and
    logs a table's reason once a minute: until install runs, every batch sweeps. Another
    reason than the last told is logged at once (a rewrite's sweep, which needs nothing,
    hid the retype's that needs install for a minute)."""
    logged: list[tuple[str, str, dict[str, object]]] = []

    class Log:
        def __getattr__(self, level: str) -> Callable[..., None]:
            return lambda event, **kw: logged.append((level, event, kw))

    monkeypatch.setattr(runner_module, "log", Log())
    r = make_runner(world, FakeSource(world, []), FakeSink(world))
    orders = TableName("public", "orders")

    def batch(*stand_ins: tuple[TableName, Kind, str, int]) -> None:
        for table, kind, detail, times in stand_ins:
            r._swept_for(table, kind, StoodIn(detail, times))

    def count(name: str, table: TableName) -> float | None:
        return r.metrics.registry.get_sample_value(
            f"cdc_invalidator_{name}_sweeps_total", {"table": str(table)}
        )

    batch((USERS, Kind.UNRENDERABLE, "email is gone", 500), (orders, Kind.BULK, "1000", 2))
    world.clock.advance(59.0)
    batch(
        (USERS, Kind.UNRENDERABLE, "email is gone", 1), (orders, Kind.UNRENDERABLE, "id is gone", 3)
    )
    world.clock.advance(1.0)
    batch((USERS, Kind.UNRENDERABLE, "email is gone", 1), (orders, Kind.BULK, "1000", 1))
    world.clock.advance(1.0)
    batch((USERS, Kind.UNRENDERABLE, "id retyped", 1), (orders, Kind.UNRENDERABLE, "id is gone", 1))

    assert count("unrenderable", USERS) == 4
    assert count("unrenderable", orders) == 2
    assert count("bulk", orders) == 3
    assert [(level, event, kw["table"]) for level, event, kw in logged] == [
        ("warning", "unrenderable_changes_swept", "public.users"),
        ("info", "bulk_statements_swept", "public.orders"),
        ("warning", "unrenderable_changes_swept", "public.orders"),
        ("warning", "unrenderable_changes_swept", "public.users"),
        ("info", "bulk_statements_swept", "public.orders"),
        ("warning", "unrenderable_changes_swept", "public.users"),
    ]
    reasons = [kw.get("reason") for _, _, kw in logged]
    assert reasons == ["email is gone", None, "id is gone", "email is gone", None, "id retyped"]


def test_unrenderable_reasons_are_logged_each_once_a_minute_and_boundedly(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two reasons alternating batch by batch are logged once each a minute (only the
    last reason told was remembered: every batch logged); reasons made up without end
    (logical mode: any role's message) log at most UNRENDERABLE_REASONS_TOLD lines a
    minute per table, and the runner remembers no more than that many."""
    logged: list[dict[str, object]] = []

    class Log:
        def __getattr__(self, level: str) -> Callable[..., None]:
            return lambda event, **kw: logged.append(kw)

    monkeypatch.setattr(runner_module, "log", Log())
    r = make_runner(world, FakeSource(world, []), FakeSink(world))
    for _ in range(50):
        r._swept_for(USERS, Kind.UNRENDERABLE, StoodIn("new row", 1))
        r._swept_for(USERS, Kind.UNRENDERABLE, StoodIn("old row", 1))
        world.clock.advance(0.1)
    assert [line["reason"] for line in logged] == ["new row", "old row"]
    world.clock.advance(60.0)
    r._swept_for(USERS, Kind.UNRENDERABLE, StoodIn("new row", 1))
    assert logged[-1]["sweeps_not_logged"] == 98
    for i in range(1000):
        r._swept_for(USERS, Kind.UNRENDERABLE, StoodIn(f"made up {i}", 1))
    assert len(logged) == 3 + runner_module.UNRENDERABLE_REASONS_TOLD - 1
    assert len(r._unrenderable_told[USERS]) == runner_module.UNRENDERABLE_REASONS_TOLD


def test_a_change_the_mapping_lacks_ends_the_runner_unacknowledged_once_the_file_changed(
    world: World,
) -> None:
    """A batch holding a change of a table the mapping does not name, read after the
    configuration file changed: the runner stops with ConfigurationChanged before
    deleting or acknowledging anything, to be started again with the file. With the file
    unchanged, the change is a dead letter."""
    answers = deque([True])  # the batch's look at the file (no other comes first)
    source = FakeSource(world, [Arrives([1])])
    sink = FakeSink(world)
    runner = Runner(
        connect=Connector(world, source, []),
        mapper=Mapper({TableName("public", "orders"): [KeyTemplate.parse("order:{id}")]}),
        sink=sink,
        config=RunnerConfig(),
        stopper=world.stopper,
        mapping_changed=answers.popleft,
    )
    with pytest.raises(ConfigurationChanged, match=r"public\.users is not in the configuration"):
        runner.run()
    assert [e[0] for e in world.log if e[0] in ("batch", "delete", "ack")] == ["batch"]

    unchanged = FakeSource(world, [Arrives([2])])
    Runner(
        connect=Connector(world, unchanged, []),
        mapper=Mapper({TableName("public", "orders"): [KeyTemplate.parse("order:{id}")]}),
        sink=FakeSink(world),
        config=RunnerConfig(),
        stopper=world.stopper,
        mapping_changed=lambda: False,
    ).run()
    assert ("ack", [2]) in world.log


# --- the configuration file -----------------------------------------------------------------


def looks(world: World, changed: bool = False) -> Callable[[], bool]:
    """mapping_changed(): logs each look at the configuration file, answers `changed`."""

    def look() -> bool:
        world.log.append(("file",))
        return changed

    return look


def test_the_file_is_looked_at_after_a_batchs_deletes_and_before_it_acknowledges(
    world: World,
) -> None:
    """Not before the batch is read: a commit's wake-up does not wait for a stat()."""
    source = FakeSource(world, [Arrives([1])])
    make_runner(world, source, FakeSink(world), mapping_changed=looks(world)).run()
    handled = [e[:2] for e in world.log if e[0] in ("batch", "delete", "file", "ack")]
    assert handled == [("batch", [1]), ("delete", keys(1)), ("file",), ("ack", [1])]


def test_a_changed_file_stops_the_runner_with_the_batch_deleted_but_unacknowledged(
    world: World,
) -> None:
    """Its deletes, of a mapping the file no longer holds, are extra ones; the batch comes
    again to the listener started with the file."""
    source = FakeSource(world, [Arrives([1])])
    runner = make_runner(world, source, FakeSink(world), mapping_changed=looks(world, True))
    with pytest.raises(ConfigurationChanged, match="configuration file's tables changed"):
        runner.run()
    handled = [e[:2] for e in world.log if e[0] in ("batch", "delete", "file", "ack")]
    assert handled == [("batch", [1]), ("delete", keys(1)), ("file",)]


def test_an_idle_listener_stops_for_a_changed_file(world: World) -> None:
    source = FakeSource(world, [Arrives([1], at=T0 + 5.0)], stop_when_done=False)
    runner = make_runner(world, source, FakeSink(world), mapping_changed=looks(world, True))
    with pytest.raises(ConfigurationChanged):
        runner.run()
    assert [e[:2] for e in world.log if e[0] in ("batch", "file", "ack")] == [
        ("batch", []),
        ("file",),
    ]


@pytest.mark.parametrize("changed", [False, True], ids=["same file", "changed file"])
def test_an_early_batch_leaves_the_look_at_the_file_to_the_batch_that_acknowledges(
    world: World, changed: bool
) -> None:
    """Its deletes go out without one (it acknowledges nothing; of a changed file's old
    mapping, they are extra ones); the queue read after it, whose skip of them is their
    acknowledgement, looks first, and stops the runner for a changed file."""
    source = FakeSource(world, [Arrives([1], early=True), Arrives([1])])
    runner = make_runner(world, source, FakeSink(world), mapping_changed=looks(world, changed))
    if changed:
        with pytest.raises(ConfigurationChanged):
            runner.run()
    else:
        runner.run()
    handled = [e[:2] for e in world.log if e[0] in ("batch", "delete", "file", "ack", "early done")]
    looked = [
        ("batch", [1]),
        ("delete", keys(1)),
        ("early done", [1]),
        ("batch", [1]),
        ("delete", keys(1)),
        ("file",),
    ]
    assert handled == (looked if changed else [*looked, ("ack", [1])])


def test_a_share_confirmed_later_looks_at_the_file_before_it_acknowledges(world: World) -> None:
    source = FakeSource(world, [Arrives([1], confirm_later=True), Arrives([2])])
    make_runner(world, source, FakeSink(world), mapping_changed=looks(world)).run()
    handled = [e[:2] for e in world.log if e[0] in ("batch", "delete later", "file", "ack")]
    assert handled[:4] == [("batch", [1]), ("delete later", keys(1)), ("file",), ("ack", [1])]


def test_a_replay_looks_at_the_file_before_it_renders(world: World) -> None:
    source = FakeSource(world, [Arrives([1])])
    watch = FakeWatch(world, replays=True)
    make_runner(world, source, FakeSink(world), watch=watch, mapping_changed=looks(world)).run()
    kinds = world.kinds()
    assert kinds[kinds.index("check") + 1 : kinds.index("check") + 4] == [
        "settle",
        "file",
        "replay",
    ]


def test_an_outage_that_turns_into_another_error_tells_it(world: World) -> None:
    """One line when Redis goes away, none per retry of the same error; another error
    during the same outage is told too (its first alone told it: a review saw
    `client|setname` refused, then an UNLINK the ACL refused, never shown), at most every
    RETELL_AFTER_S; back, one line."""
    redis_ = runner_module.Availability("redis", Metrics())
    first = redis.exceptions.NoPermissionError("no permissions to run 'client|setname'")
    then = redis.exceptions.NoPermissionError("the Redis user's ACL refused UNLINK of 'order:1'")
    with captured_logs() as logs:
        redis_.down(first)
        world.clock.advance(60)
        redis_.down(first)  # (the same: not told again)
        redis_.down(then)
        world.clock.advance(1)
        redis_.down(first)  # (another, but a moment after the last told)
        world.clock.advance(runner_module.RETELL_AFTER_S)
        redis_.down(then)  # (what was told last)
        redis_.up()
    told = [(line["event"], line.get("error", "")) for line in logs]
    assert told == [
        ("redis_unavailable", f"NoPermissionError: {first}"),
        ("redis_unavailable", f"NoPermissionError: {then}"),
        ("redis_available", ""),
    ]
    assert logs[1]["down_s"] == 60
