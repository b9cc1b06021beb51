"""Small pure units: redaction, back-off, the stop pipe, error checks (no servers)."""

from __future__ import annotations

import json
import random
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import psycopg
import pytest
from prometheus_client import generate_latest

from cdc_invalidator import cli
from cdc_invalidator.backoff import Backoff
from cdc_invalidator.capture.errors import Fatal, returned
from cdc_invalidator.capture.lineage import AfterCrash, CrashSetting, crashed_since, gone_back
from cdc_invalidator.capture.trigger_queue import (
    Chunk,
    FetchKey,
    ReadAhead,
    Retention,
    Snapshot,
    fetch_key,
)
from cdc_invalidator.capture.visibility import Complete
from cdc_invalidator.durations import format_duration, parse_duration
from cdc_invalidator.mapping import Mapper
from cdc_invalidator.metrics import Metrics
from cdc_invalidator.pg.standbys import names_standby
from cdc_invalidator.redact import Scrubber, redact_url, secrets_of
from cdc_invalidator.redis_guard.window import UNKNOWN_PERSISTENCE_S, persistence_window
from cdc_invalidator.runner import Runner, RunnerConfig, Source
from cdc_invalidator.shutdown import Stopper
from cdc_invalidator.sink import Persistence, Sink


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://user:p%40ss@cache/0", "rediss://user:***@cache/0"),
        ("host=db password=s3cret user=app", "host=db password=*** user=app"),
        ("host=db password='a b' user=app", "host=db password=*** user=app"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_scrubber_removes_known_secrets_anywhere() -> None:
    scrub = Scrubber(secrets_of("postgresql://app:hunter2@db/app", "redis://:p%40ss@c/0"))
    text = "auth failed for hunter2 and p@ss and p%40ss at postgresql://x:y@h/d"
    out = scrub(text)
    for secret in ("hunter2", "p@ss", "p%40ss", ":y@"):
        assert secret not in out


def test_secrets_of_keyword_dsn() -> None:
    assert secrets_of("host=db password=hunter2") == ["hunter2"]
    assert secrets_of("", "postgresql://db/app") == []


def test_backoff_grows_exponentially_with_jitter_and_caps() -> None:
    backoff = Backoff(0.1, 1.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    for delay, base in zip(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0], strict=True):
        assert base * 0.9 <= delay <= base * 1.1
    assert len({round(d, 6) for d in delays[4:]}) > 1  # jitter: not in lock-step
    backoff.reset()
    assert backoff.next_delay() <= 0.11


def test_stopper_wakes_select_and_is_idempotent() -> None:
    stopper = Stopper()
    try:
        assert not stopper.stopped
        assert select.select([stopper.fileno()], [], [], 0)[0] == []
        stopper.stop()
        stopper.stop()
        assert stopper.stopped
        assert select.select([stopper.fileno()], [], [], 0)[0] == [stopper.fileno()]
        assert stopper.sleep(5) is True  # returns at once once stopped
    finally:
        stopper.close()


# A SIGALRM lands at a random point of the main thread's sleep() loop and calls stop()
# there, 2,000 times. With a threading.Event this deadlocked within seconds: the handler
# waited for a lock the thread it interrupted was holding. (A subprocess: a hang fails the
# test through its timeout instead of hanging the suite.)
_STOP_IN_A_SIGNAL_HANDLER = """
import random, signal
from cdc_invalidator.shutdown import Stopper
for _ in range(2000):
    stopper = Stopper()
    previous = signal.signal(signal.SIGALRM, lambda *_: stopper.stop())
    signal.setitimer(signal.ITIMER_REAL, random.uniform(0, 0.002))
    while not stopper.sleep(0.0003):
        pass
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
    stopper.close()
"""


def test_stop_from_a_signal_handler_never_deadlocks() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _STOP_IN_A_SIGNAL_HANDLER],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15m", 900.0),
        ("90s", 90.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("500ms", 0.5),
        ("2d", 172800.0),
        ("10", 10.0),
        (3, 3.0),
        (2.5, 2.5),
        ("0s", 0.0),
        (" 1H ", 3600.0),
    ],
)
def test_durations_parse(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "m", "-1m", "1x", "15m!", "h1", "1.5.2s"])
def test_a_bad_duration_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration: write a number with a unit"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.5, "0.5s"), (59, "59s"), (60, "1m"), (90, "1m30s"), (5400, "1h30m")]
)
def test_durations_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_value_postgresql_always_returns_is_checked_not_asserted() -> None:
    row = ("0/16B3748",)
    assert returned(row, "position for new slot 's'") is row
    with pytest.raises(Fatal, match=r"^PostgreSQL returned no position for new slot 's'$"):
        returned(None, "position for new slot 's'")


# --- the Grafana dashboard ----------------------------------------------------------

# Read from the database at scrape time (asserted by the tests above, per mode).
DATABASE_METRICS = {
    "cdc_invalidator_status_up",
    "cdc_invalidator_backlog_events",
    "cdc_invalidator_oldest_pending_seconds",
    "cdc_invalidator_notify_queue_usage",
    "cdc_invalidator_dead_letters_stored",
    "cdc_invalidator_slot_lag_bytes",
    "cdc_invalidator_slot_held_wal_bytes",
    "cdc_invalidator_slot_active",
    "cdc_invalidator_slot_safe_wal_bytes",
}


def test_the_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    dashboard = json.loads(
        (Path(__file__).parent.parent / "deploy" / "grafana" / "cdc-invalidator.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", n)
        for e in exprs
        for n in re.findall(r"cdc_invalidator_\w+", e)
    }
    exposed = set(re.findall(r"^# TYPE (\w+) ", generate_latest(Metrics().registry).decode(), re.M))
    # Counters are exposed as name_total; the dashboard uses the samples' names.
    samples = exposed | {f"{n}_total" for n in exposed} | DATABASE_METRICS
    assert used - samples == set()
    assert len(used) >= 10


# --- which processed queue rows may go, when they are kept for replay ---------------------


def test_persistence_window_is_the_longest_of_the_servers() -> None:
    aof = Persistence({"appendonly": "yes", "appendfsync": "everysec", "save": ""})
    rdb = Persistence({"appendonly": "no", "save": "900 1 300 10"})
    assert persistence_window([aof, rdb]) == (900, "RDB snapshots (save '900 1 300 10')")
    refused = Persistence({}, refused="NOPERM")
    window, why = persistence_window([aof, refused])
    assert window == UNKNOWN_PERSISTENCE_S
    assert why.startswith("CONFIG GET refused (NOPERM)")


def test_retention_prunes_below_the_newest_snapshot_finished_long_enough_ago(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    a, b, c = (Snapshot.parse(f"{n}:{n}:") for n in (10, 20, 30))
    retention = Retention(keep_s=60)
    assert retention.prunable(a) is None  # finished just now
    clock[0] = 130
    assert retention.prunable(b) is None
    clock[0] = 160
    assert retention.prunable(b) is a  # a is 60 s old, b only 30
    clock[0] = 200
    assert retention.prunable(c) is b  # b is 70 s old now: the newest old enough
    assert retention.prunable(c) is b  # still, until c is
    clock[0] = 260
    assert retention.prunable(c) is c
    assert Retention(keep_s=0).prunable(a) is a  # nothing kept: prune below the latest


# --- what /healthz and /readyz answer -------------------------------------------------------


def test_health_follows_the_loop_the_stores_and_the_lag() -> None:
    stopper = Stopper()
    runner = Runner(
        connect=lambda: cast(Source, None),
        mapper=Mapper({}),
        sink=cast(Sink, None),
        config=RunnerConfig(),
        stopper=stopper,
    )
    try:
        runner.postgres.up()
        assert (runner.health(60, 30).alive, runner.health(60, 30).ready) == (True, True)
        runner.active = True  # an active listener needs Redis too
        assert not runner.health(60, 30).ready
        runner.redis.up()
        assert runner.health(60, 30).ready
        runner.behind_s = 31.0  # behind by more than allowed
        state = runner.health(60, 30)
        assert (state.alive, state.ready, state.detail["behind_s"]) == (True, False, 31.0)
        runner.behind_s = 0.0
        # A batch held up in hand (Redis holding its deletes): as old as its oldest change.
        runner.in_hand_since = time.monotonic() - 31.0
        state = runner.health(60, 30)
        assert (state.alive, state.ready) == (True, False)
        behind = state.detail["behind_s"]
        assert isinstance(behind, float)
        assert 31.0 <= behind < 40.0
        runner.in_hand_since = time.monotonic() - 1.0  # younger than the allowed lag
        assert runner.health(60, 30).ready
        runner.in_hand_since = None
        runner.turned_at -= 61  # the loop has not turned for a minute
        state = runner.health(60, 30)
        assert (state.alive, state.ready) == (False, False)
        runner.active = False  # a standby whose loop stalls is not alive either
        assert not runner.health(60, 30).alive
    finally:
        stopper.close()


def test_lags_observed_together_expose_what_one_by_one_would() -> None:
    """observe_lags() writes prometheus_client's fields itself: same exposition as
    observe() per value, bucket edges included (a value equal to a bound is in it)."""
    values = [0.0, 0.0005, 0.0007, 0.001, 0.004, 0.004, 2.5, 1e9]
    together, one_by_one = Metrics(), Metrics()
    together.observe_lags(values)
    for value in values:
        one_by_one.lag.observe(value)

    def lag_lines(metrics: Metrics) -> list[str]:
        text = generate_latest(metrics.registry).decode()
        lines = text.splitlines()
        return [x for x in lines if "commit_to_delete_seconds" in x and "_created" not in x]

    assert lag_lines(together) == lag_lines(one_by_one)
    assert any(line.endswith(" 8.0") for line in lag_lines(together))  # the count


def test_a_chunk_finds_its_header_wherever_it_comes_and_counts_its_rows() -> None:
    """fetch_batch.sql's header row says where the next chunk starts: UNION ALL promises
    no order, so it is found by its first column, not taken as the first row. It also
    counts the chunk's events, a pack weighing its rows."""
    row_a = (None, 700, None, 5, "public", "users", "U", '{"id": "1"}', '{"id": "1"}', None)
    # A pack of 3 rows: the chunk's events count it as 3.
    row_b = (None, 701, None, 9, "public", "users", "D", '{"id": ["2", "3", "4"]}', None, 3)
    header = ("10:12:", 2, 701, 9, "11:13:", None, None, "[[700, 0.5], [701, 0.25]]", None, 4)
    chunk = Chunk.read([row_a, header, row_b])
    assert chunk.window == "10:12:"
    assert chunk.now == "11:13:"
    assert chunk.rows == [row_a, row_b]
    assert chunk.last == ("701", 9)
    assert chunk.xid_ages == {700: 0.5, 701: 0.25}
    assert chunk.events == 4
    empty = Chunk.read([("10:12:", 0, None, None, None, None, None, None, None, 0)])
    assert (empty.rows, empty.last, empty.xid_ages, empty.events) == ([], None, {}, 0)
    with pytest.raises(Fatal, match="counted 3 rows and returned 2"):
        Chunk.read([row_a, row_b, (*header[:1], 3, *header[2:])])


def test_a_read_ahead_is_taken_only_for_the_read_it_was_started_for() -> None:
    """The next chunk read ahead serves the batch() that continues from an acknowledged
    chunk; after a chunk that was not acknowledged (another key) it is thrown away, and
    its failure is raised only to the read it stood for."""
    reads: list[FetchKey] = []

    def fetch(key: FetchKey) -> tuple[float, list[tuple[object, ...]]]:
        reads.append(key)
        if key[6] < 0:
            raise psycopg.OperationalError("gone")
        return 1.0, [(key,)]

    ahead = ReadAhead(fetch)
    done = Snapshot.parse("10:12:")
    nxt = fetch_key(done, done, ("11", 5), 100)
    assert ahead.take(nxt) is None  # nothing started
    ahead.start(nxt)
    assert ahead.take(nxt) == (1.0, [(nxt,)])
    assert ahead.take(nxt) is None  # taken once
    ahead.start(nxt)
    again = fetch_key(done, None, ("0", 0), 100)  # the chunk was not acknowledged
    assert ahead.take(again) is None
    failing = fetch_key(done, done, ("11", 5), -1)
    ahead.start(failing)
    assert ahead.take(again) is None  # another read's failure: not this one's
    ahead.start(failing)
    with pytest.raises(psycopg.OperationalError):
        ahead.take(failing)
    ahead.close()
    assert reads == [nxt, nxt, failing, failing]


def test_complete_knows_which_streamed_transactions_had_ended_across_wraparound() -> None:
    """pg_current_snapshot() gives 64-bit xids, the stream 32-bit ones, compared in
    PostgreSQL's circular order."""
    epoch = 3 << 32
    xmin, xmax = epoch + 2**32 - 10, epoch + 2**32 + 5
    # In progress: xmin itself (the oldest running) and 1, after the wrap.
    near_wrap = Complete.parse(f"{xmin}:{xmax}:{xmin},{epoch + 2**32 + 1}", 1.0)
    assert near_wrap.has(2**32 - 11)  # before xmin
    assert not near_wrap.has(2**32 - 10)  # xmin itself was in progress
    assert near_wrap.has(0)  # after the wrap, below xmax, not in progress
    assert not near_wrap.has(1)  # in progress
    assert not near_wrap.has(5)  # xmax: not yet started
    assert not near_wrap.has(7)
    assert near_wrap.at == 1.0


def test_rows_compressed_with_lz4_on_a_server_without_it_are_explained() -> None:
    """After pg_upgrade to a build without lz4, every start of the listener exited with
    PostgreSQL's bare message (a review): it says where the rows came from, and where
    the guide says what to do."""
    said = cli._explain(psycopg.errors.FeatureNotSupported("compression method lz4 not supported"))
    assert "carried to a server built without it" in said, said
    assert "docs/DBA.md" in said, said


def test_a_privilege_refused_in_another_language_gets_advice_that_fits_either_schema() -> None:
    """The schema is found in PostgreSQL's English message only: under another
    lc_messages, an application's schema was sent to grant_listener(), which grants only
    ours (a review, German)."""
    german = "keine Berechtigung für Schema shop"
    said = cli._explain(psycopg.errors.InsufficientPrivilege(german))
    assert "grant_listener()" in said, said
    assert "USAGE on the configured tables' schemas" in said, said
    ours = cli._explain(
        psycopg.errors.InsufficientPrivilege("permission denied for schema cdc_invalidator")
    )
    assert "USAGE on the configured" not in ours, ours


@pytest.mark.parametrize(
    ("names", "named"),
    [
        ("", False),
        ("*", True),
        ("standby1, *", True),
        ("FIRST 1 (standby1, standby2)", False),
        ("ANY 2 (s1, CDC-INVALIDATOR, s2)", True),  # case ignored
        ('2 ("cdc-invalidator")', True),
        ('"CDC-Invalidator"', True),  # quoted too
        ("first 1 (*)", True),
        ("cdc-invalidator-cli", False),
    ],
)
def test_synchronous_standby_names_naming_the_listeners_stream(names: str, named: bool) -> None:
    """check and the listener (pg/standbys.py): a logical listener that PostgreSQL may
    make a synchronous standby holds every commit of the server (review: 10 minutes for
    a write to another database)."""
    assert names_standby(names, "cdc-invalidator") is named


@pytest.mark.parametrize(
    ("setting", "places", "sweeps"),
    [
        ("auto", ("ALTER DATABASE app",), True),
        ("auto", (), False),
        ("always", (), True),
        ("never", (), False),
    ],
)
def test_after_crash_sweeps_where_writers_commit_asynchronously(
    setting: CrashSetting, places: tuple[str, ...], sweeps: bool
) -> None:
    """capture/lineage.py: sweep_after_crash, with where asynchronous commits were found,
    and what the log says of it."""
    crash = AfterCrash(setting, places)
    assert crash.sweeps is sweeps
    said = crash.said()
    if setting != "auto":
        assert said.startswith(f"sweep_after_crash = {setting}"), said
    elif places:
        assert f"({places[0]})" in said
    else:
        assert "no setting of the server, the database or a role" in said


def test_crashed_since_compares_known_runs_only() -> None:
    assert crashed_since("1000", "2000")
    assert not crashed_since("1000", "1000")
    assert not crashed_since(None, "1000")  # none recorded (an older release)
    assert not crashed_since("1000", None)  # a kind reset by hand since: unknown


def test_gone_back_is_another_system_or_an_older_timeline() -> None:
    """capture/lineage.py: what the listener's previous session saw against the server
    now (logical mode's rule; trigger mode's note_server_v3() has the same)."""
    here = "7001 timeline 2"
    assert gone_back("7001 timeline 3", here)  # the old primary, a failover undone
    assert gone_back("7002 timeline 1", here)  # another system
    assert not gone_back("7001 timeline 1", here)  # a promotion another listener took
    assert not gone_back(here, here)
    assert not gone_back(None, here)
    assert not gone_back(here, None)
