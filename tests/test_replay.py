"""Replay after Redis comes back older than it went down, `replay --since`, and the
second delete for the stale-set race. Both capture modes, real servers.

The seed scenario: the app caches rows, Redis snapshots, an admin edits the rows (the
listener deletes their keys), Redis is killed and restarts on that snapshot: the stale
keys are back. The listener notices the new server and deletes them again.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from cdc_invalidator.capture.rows import Decoded, MapPack
from cdc_invalidator.capture.trigger_queue import TriggerCapture
from cdc_invalidator.cli import main
from cdc_invalidator.mapping import Routed
from cdc_invalidator.mapping.mapper import Era
from cdc_invalidator.modes import logical as logical_mode
from cdc_invalidator.modes import trigger as trigger_mode
from cdc_invalidator.modes.choose import mode_for
from cdc_invalidator.pg.connect import PgConnector
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.redis_guard.identity import IdentityStore
from cdc_invalidator.redis_guard.watch import RedisWatch
from cdc_invalidator.redis_guard.window import UNKNOWN_PERSISTENCE_S, persistence_window
from cdc_invalidator.runner import ConfigurationChanged
from cdc_invalidator.settings import load_settings
from cdc_invalidator.sink import RedisSink
from cdc_invalidator.sink.protocol import identity_of
from cdc_invalidator.sweeper import Ticket
from tests.support.env import Env, redis_of
from tests.support.faults import (
    acknowledged,
    blocked_on_redis,
    cache,
    crash_onto_the_snapshot,
    keys_of,
    queue_blocks_read,
    read_and_saved,
    setup_users,
    with_rdb_snapshots,
    write,
)
from tests.support.listener import ListenerProcess, Spawn, listening, run_cli, stop_listener
from tests.support.servers import RedisServer
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]

ROWS = range(1, 51)
# Cached before the snapshot, never invalidated: a replay must not touch it.
BYSTANDER = "session:42"


# The replay alone (second_delete_ms = 0 where a test counts what a replay finds): the
# edit's second deletes, owed when Redis restarts on the snapshot, would delete some
# restored keys before the replay finds them.


def edit_every_row(env: Env) -> None:
    env.sql("UPDATE users SET email = 'new' || id || '@x' WHERE id BETWEEN 1 AND 50")


def cached(r: redis.Redis) -> int:
    return int(r.exists(*[k for i in ROWS for k in keys_of(i)]))


def replay_deletes_every_row_again(config: Path, since: str) -> subprocess.CompletedProcess[str]:
    """`replay --since` after every row's keys were cached again (a backup restored):
    it deletes them all again; what it ran, for the caller's further checks."""
    done = run_cli("replay", "--since", since, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"{2 * len(ROWS)} keys were back and are deleted again" in done.stdout, done.stdout
    return done


def snapshot_then_edit(env: Env, listener: ListenerProcess) -> redis.Redis:
    """The seed's story up to the crash: cache, SAVE, edit (the listener deletes)."""
    r = env.redis()
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    cache(r, ROWS)
    r.set(BYSTANDER, "fresh")
    r.save()
    edit_every_row(env)
    wait_until(lambda: cached(r) == 0, what="the edit's keys deleted")
    return r


def test_redis_restored_from_an_old_snapshot_gets_its_stale_keys_deleted_again(
    own_env: Env, spawn: Spawn
) -> None:
    with_rdb_snapshots(own_env)
    config = setup_users(own_env, rows=len(ROWS), replay_history="1h", second_delete_ms=0)
    listener = spawn(config)
    r = snapshot_then_edit(own_env, listener)

    crash_onto_the_snapshot(own_env)
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    r = own_env.redis()
    assert cached(r) == 0
    changed = listener.logged("redis_changed")[0]
    # The window came from the server's own settings.
    assert "save '3600 1'" in changed["window"], changed
    assert changed["replay_since_s"] >= 3600
    done = listener.logged("replay_done")[0]
    # Every key the restore brought back was found there and deleted.
    assert done["existed"] == 2 * len(ROWS), done
    assert r.get(BYSTANDER) == "fresh", "a replay deletes only what was invalidated"
    # Going on as before, on the new server.
    r.set("user:1", "stale")
    own_env.sql("UPDATE users SET email = 'again@x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="a change after the replay")
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["trigger"])  # what Redis says, whichever the mode
def test_a_dump_older_than_the_settings_say_is_replayed_back_to_it_twice(
    own_env: Env, spawn: Spawn
) -> None:
    """Redis saves every 5 s by its settings, so a restart loses 5 s of deletes at most;
    but the snapshots after the first did not happen (failing, as on a full disk: here
    switched off), and the server restarts on that first dump. Then the restarted server
    crashes again before its own first snapshot and loads the same dump once more. Each
    replay reaches back to the dump: what INFO persistence said at the checks before."""
    server = redis_of(own_env)
    server.args = [*server.args, "--save", "5 1"]
    server.restart()
    config = setup_users(own_env, rows=len(ROWS), replay_history="1h", second_delete_ms=0)
    listener = spawn(config)
    r = snapshot_then_edit(own_env, listener)
    r.config_set("save", "")  # no snapshot after the SAVE: lastsave stays, changes count
    edited = time.monotonic()
    # The edit's deletes must be older than what the settings say a restart can lose
    # (5 s of snapshots, and a 5 s margin): a time to let pass, not an event to wait on.
    time.sleep(max(0.0, edited + 12 - time.monotonic()))

    crash_onto_the_snapshot(own_env)
    wait_until(lambda: cached(own_env.redis()) == 0, what="the replay of the older dump")
    assert "the data on disk" in listener.logged("redis_changed")[0]["window"]
    # Before the restarted server's first snapshot (5 s after it started): it crashes.
    own_env.redis().config_set("save", "")
    crash_onto_the_snapshot(own_env)
    wait_until(lambda: len(listener.logged("replay_done")) == 2, what="the second replay")
    assert cached(own_env.redis()) == 0
    assert listener.logged("replay_done")[1]["existed"] == 2 * len(ROWS)
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["trigger"])  # what Redis says, whichever the mode
def test_a_dump_holds_the_data_of_its_fork_not_of_its_save_time(own_env: Env, spawn: Spawn) -> None:
    """A BGSAVE writes what the data was when it forked, and takes as long as the data
    is big (seconds to minutes); rdb_last_save_time is when it finished. Deletes made
    while it was writing are not in the dump, though they are older than that save
    time: a replay reaching back to rdb_last_save_time missed them. Here the BGSAVE
    takes 15 s (rdb-key-save-delay), the edit's deletes come right after its fork, and
    Redis crashes a few seconds after it finished, onto that dump."""
    server = redis_of(own_env)
    server.args = [*server.args, "--save", "5 1"]
    server.restart()
    config = setup_users(own_env, rows=len(ROWS), replay_history="1h", second_delete_ms=0)
    listener = spawn(config)
    r = own_env.redis()
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    r.config_set("save", "")  # only the BGSAVE below
    cache(r, ROWS)
    r.config_set("rdb-key-save-delay", 150_000)  # us per key: 100 keys, 15 s
    r.bgsave()
    wait_until(lambda: r.info("persistence")["rdb_bgsave_in_progress"] == 1, what="the fork")
    edit_every_row(own_env)
    wait_until(lambda: cached(r) == 0, what="the edit's keys deleted, during the BGSAVE")
    wait_until(
        lambda: r.info("persistence")["rdb_bgsave_in_progress"] == 0,
        timeout_s=60,
        what="the BGSAVE done",
    )
    assert r.info("persistence")["rdb_last_bgsave_time_sec"] >= 10
    saved = time.monotonic()
    # Two identity checks see the finished save (redis_check_interval_ms: 1 s).
    time.sleep(max(0.0, saved + 2.5 - time.monotonic()))
    crash_onto_the_snapshot(own_env)
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    window = listener.logged("redis_changed")[0]["window"]
    assert cached(own_env.redis()) == 0, window
    assert "the data on disk of the server(s) replaced" in window
    assert listener.logged("replay_done")[0]["existed"] == 2 * len(ROWS)
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["trigger"])  # what Redis says, whichever the mode
def test_a_dump_loaded_before_the_listener_started_is_replayed_back_to_that_start(
    own_env: Env, spawn: Spawn
) -> None:
    """Redis started from a dump before the listener did, and has not saved since
    (snapshots failing, as on a full disk: here switched off): its disk holds that dump,
    older than anything the listener deleted. It crashes onto it: the replay must reach
    back to when the server started at least, not only the settings' 5 s."""
    server = redis_of(own_env)
    server.args = [*server.args, "--save", "5 1"]
    server.restart()
    config = setup_users(own_env, rows=len(ROWS), replay_history="1h", second_delete_ms=0)
    r = own_env.redis()
    cache(r, ROWS)
    r.save()
    crash_onto_the_snapshot(own_env)  # started from the dump that holds the keys
    r = own_env.redis()
    r.config_set("save", "")  # no snapshot since it started
    assert r.info("persistence")["rdb_saves"] == 0
    listener = spawn(config)
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    edit_every_row(own_env)
    wait_until(lambda: cached(r) == 0, what="the edit's keys deleted")
    edited = time.monotonic()
    # Older than the settings' 5 s and the 5 s margin: a time to let pass.
    time.sleep(max(0.0, edited + 12 - time.monotonic()))
    crash_onto_the_snapshot(own_env)
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    window = listener.logged("redis_changed")[0]["window"]
    assert cached(own_env.redis()) == 0, window
    assert "the data on disk of the server(s) replaced" in window
    stop_listener(listener)


def test_redis_restored_while_the_listener_was_down_is_replayed_on_its_start(
    own_env: Env, spawn: Spawn
) -> None:
    with_rdb_snapshots(own_env)
    config = setup_users(own_env, rows=len(ROWS), replay_history="1h")
    first = spawn(config)
    snapshot_then_edit(own_env, first)
    stop_listener(first)

    crash_onto_the_snapshot(own_env)
    assert cached(own_env.redis()) == 2 * len(ROWS), "the snapshot brought them back"
    second = spawn(config)
    wait_until(lambda: second.logged("replay_done"), what="the replay on start")
    assert cached(own_env.redis()) == 0
    assert second.logged("replay_done")[0]["existed"] == 2 * len(ROWS)
    stop_listener(second)


@pytest.mark.parametrize("capture", ["trigger"])  # logical mode stamps the deletes' time
@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
def test_a_backlog_drained_just_before_a_restore_is_replayed(
    own_env: Env, spawn: Spawn, restarted: bool
) -> None:
    """Trigger mode's replay takes the queue rows whose keys were deleted in the window,
    not those written in it: a backlog written ten minutes before it was drained is
    replayed. `restarted`: by the next listener, on its start (what the window needs is
    kept in PostgreSQL, not in the listener)."""
    with_rdb_snapshots(own_env)
    config = setup_users(
        own_env, rows=len(ROWS), replay_history="1h", replay_window="60s", second_delete_ms=0
    )
    r = own_env.redis()
    cache(r, ROWS)
    r.save()
    # Edited while no listener ran, ten minutes before it caught up (a backlog).
    edit_every_row(own_env)
    own_env.sql("UPDATE cdc_invalidator.queue_v1 SET enqueued_at = now() - interval '10 min'")
    listener = spawn(config)
    wait_until(lambda: cached(r) == 0, what="the backlog's keys deleted")
    if restarted:
        stop_listener(listener)
    crash_onto_the_snapshot(own_env)  # the deletes, a second old, lost with the server
    if restarted:
        assert cached(own_env.redis()) == 2 * len(ROWS), "the snapshot brought them back"
        listener = spawn(config)
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    assert cached(own_env.redis()) == 0
    stop_listener(listener)


def test_replay_window_zero_turns_replay_off(own_env: Env, spawn: Spawn) -> None:
    with_rdb_snapshots(own_env)
    config = setup_users(
        own_env, rows=len(ROWS), replay_history="1h", replay_window="0s", second_delete_ms=0
    )
    listener = spawn(config)
    snapshot_then_edit(own_env, listener)
    crash_onto_the_snapshot(own_env)
    wait_until(lambda: listener.logged("redis_changed"), what="the new server noticed")
    assert listener.logged("redis_changed")[0]["replay"] == "off"
    assert cached(own_env.redis()) == 2 * len(ROWS), "left stale, as configured"
    stop_listener(listener)


def invalidated_then_stopped(env: Env, spawn: Spawn) -> tuple[Path, redis.Redis]:
    """Every row cached, edited (a listener deleted the keys, replay history kept), and
    that listener stopped: what `replay --since` then reads."""
    config = setup_users(env, rows=len(ROWS), replay_history="1h")
    listener = spawn(config)
    r = env.redis()
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    cache(r, ROWS)
    edit_every_row(env)
    wait_until(lambda: cached(r) == 0, what="the edit's keys deleted")
    stop_listener(listener)
    return config, r


def test_replay_since_deletes_again_what_was_invalidated(env: Env, spawn: Spawn) -> None:
    config, r = invalidated_then_stopped(env, spawn)

    # An operator restored a backup taken before the edit.
    cache(r, ROWS)
    r.set(BYSTANDER, "fresh")
    replay_deletes_every_row_again(config, "15m")
    assert cached(r) == 0
    assert r.get(BYSTANDER) == "fresh"


@pytest.mark.parametrize("capture", ["trigger"])  # logical mode stamps the deletes' time
def test_replay_since_takes_a_backlog_drained_in_it(env: Env, spawn: Spawn) -> None:
    """`replay --since 1m` after a backlog written ten minutes ago was drained just now:
    its keys were invalidated in the last minute."""
    config = setup_users(env, rows=len(ROWS), replay_history="1h")
    edit_every_row(env)  # no listener yet
    env.sql("UPDATE cdc_invalidator.queue_v1 SET enqueued_at = now() - interval '10 min'")
    r = env.redis()
    cache(r, ROWS)
    listener = spawn(config)
    wait_until(lambda: cached(r) == 0, what="the backlog's keys deleted")
    stop_listener(listener)

    cache(r, ROWS)  # a backup from before the drain, restored
    replay_deletes_every_row_again(config, "1m")
    assert cached(r) == 0


def test_a_next_listener_redoes_what_its_predecessor_acknowledged_not_the_backlog(
    env: Env, spawn: Spawn
) -> None:
    """The second deletes a stopped listener may have owed are redone by the next one:
    the changes it acknowledged in its last second_delete_ms. Not the backlog written
    while no listener ran: the next one deletes that once, with its own second deletes
    (redoing it too, before its first batch, deleted a backlog twice and held it back)."""
    config = setup_users(env, rows=len(ROWS), second_delete_ms=3000, replay_history="1h")
    first = spawn(config)
    wait_until(lambda: first.logged("redis_identity_recorded"), what="the listener started")
    done = write(env, "UPDATE users SET email = 'new@x' WHERE id = 1", ids=range(1, 2))
    wait_until(lambda: acknowledged(env, done), what="the change acknowledged")
    first.kill()
    edit_every_row(env)  # the backlog: no listener runs
    r = env.redis()
    cache(r, ROWS)
    second = spawn(config)
    wait_until(lambda: cached(r) == 0, what="the backlog's keys deleted")
    wait_until(lambda: second.logged("second_deletes_redone"), what="the redo logged")
    [redone] = second.logged("second_deletes_redone")
    assert redone["events"] == 1, redone
    stop_listener(second)


def test_a_stale_set_after_a_handover_is_deleted_when_the_second_delete_falls_due(
    env: Env, spawn: Spawn
) -> None:
    """A listener stopped, and the next one started, within second_delete_ms of a change:
    the first did its second deletes as it stopped, the next redid them as it started,
    both before their time. A reader that read the old row before the change SETs it
    after both: it is deleted again once the second delete falls due, as without the
    handover (it stayed cached for good)."""
    config = setup_users(env, rows=len(ROWS), second_delete_ms=6000, replay_history="1h")
    r = env.redis()
    first = spawn(config)
    wait_until(lambda: first.logged("redis_identity_recorded"), what="the listener started")
    r.set("user:7", "cached")
    done = write(env, "UPDATE users SET email = 'n7@x' WHERE id = 7", ids=range(7, 8))
    wait_until(lambda: acknowledged(env, done), what="the change acknowledged")
    stop_listener(first)
    second = spawn(config)
    wait_until(lambda: second.logged("second_deletes_redone"), what="the redo")
    r.set("user:7", "stale")  # a slow reader's SET, in time: 6 s after the change at most
    wait_until(lambda: r.exists("user:7") == 0, what="the stale SET deleted again")
    assert len(second.logged("second_deletes_redone")) == 2
    stop_listener(second)


# --- rows the listener would dead-letter: skipped and logged, never a crash -------------

# Past Python's int conversion limit (4300 digits): json.loads, and with it the driver's
# json loader, refuse it.
HUGE = "9" * 5000
# (columns, values, what the skip must say) per mode.
POISON = {
    "trigger": [
        (
            "schema_name, table_name, op, old_row",
            ["public", "users", "D", f'{{"id": {HUGE}}}'],
            "old_row cannot be parsed",
        ),
        (
            "schema_name, table_name, op, new_row",
            ["public", "ghost", "I", '{"id": "1"}'],
            "not in the configuration",
        ),
    ],
    "logical": [
        ("events", [f'[["public", "users", "D", {{"id": {HUGE}}}, null]]'], "cannot be parsed"),
        ("events", ['[["public", "ghost", "I", null, {"id": "1"}]]'], "not in the configuration"),
        ("events", ['{"not": "an array"}'], "events is dict, expected a JSON array"),
    ],
}


def poison(env: Env) -> dict[int, str]:
    """Rows no listener of this configuration wrote (by hand, or before a table left the
    configuration), where replay reads: their ids, with what their skip must say."""
    table = "history_v1" if env.logical else "queue_v1"
    written = {}
    with env.connect() as conn:
        for columns, values, reason in POISON[env.capture]:
            row = conn.execute(
                f"INSERT INTO cdc_invalidator.{table} ({columns}) VALUES "
                f"({', '.join(['%s'] * len(values))}) RETURNING id".encode(),
                values,
            ).fetchone()
            assert row is not None
            written[int(row[0])] = reason
    return written


def edit_around_poison(env: Env, r: redis.Redis) -> dict[int, str]:
    """Half the rows edited (and invalidated), poisoned rows, then the other half: replay
    meets good rows on either side of the bad ones."""
    env.sql("UPDATE users SET email = 'new' || id || '@x' WHERE id BETWEEN 1 AND 25")
    wait_until(lambda: cached(r) == len(ROWS), what="the first half's keys deleted")
    if env.logical:  # recorded after Redis confirmed: the poison must come after it
        wait_until(
            lambda: env.scalar("SELECT count(*) FROM cdc_invalidator.history_v1") > 0,
            what="the first half recorded for replay",
        )
    bad = poison(env)
    env.sql("UPDATE users SET email = 'new' || id || '@x' WHERE id BETWEEN 26 AND 50")
    wait_until(lambda: cached(r) == 0, what="the second half's keys deleted")
    return bad


def test_replay_after_redis_restarts_skips_bad_rows_and_the_listener_runs_on(
    own_env: Env, spawn: Spawn
) -> None:
    with_rdb_snapshots(own_env)
    config = setup_users(own_env, rows=len(ROWS), replay_history="1h", second_delete_ms=0)
    listener = spawn(config)
    r = own_env.redis()
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    cache(r, ROWS)
    r.save()
    bad = edit_around_poison(own_env, r)

    crash_onto_the_snapshot(own_env)
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    assert cached(own_env.redis()) == 0, "the good rows before and after the bad were replayed"
    done = listener.logged("replay_done")[0]
    assert done["existed"] == 2 * len(ROWS), done
    assert done["skipped"] == len(bad), done
    skipped = {line["row"]: line for line in listener.logged("replay_skipped")}
    assert set(skipped) == set(bad)
    for row, reason in bad.items():
        assert reason in skipped[row]["reason"], skipped[row]
        assert skipped[row]["source"] == ("history_v1" if own_env.logical else "queue_v1")
    # Running on: a change after the replay is invalidated, and it stops cleanly.
    assert listener.process is not None
    assert listener.process.poll() is None
    r = own_env.redis()
    r.set("user:1", "stale")
    own_env.sql("UPDATE users SET email = 'again@x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="a change after the replay")
    stop_listener(listener)


def test_replay_since_skips_bad_rows_and_replays_the_rest(env: Env, spawn: Spawn) -> None:
    config = setup_users(env, rows=len(ROWS), replay_history="1h")
    listener = spawn(config)
    r = env.redis()
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    cache(r, ROWS)
    bad = edit_around_poison(env, r)
    stop_listener(listener)

    cache(r, ROWS)  # a backup from before the edits, restored
    done = replay_deletes_every_row_again(config, "15m")
    assert cached(r) == 0
    assert "Traceback" not in done.stderr
    skips = {
        int(m.group(1)): line
        for line in done.stderr.splitlines()
        if " replay_skipped " in line and (m := re.search(r" row=(\d+)", line))
    }
    assert set(skips) == set(bad), done.stderr
    for row, reason in bad.items():
        assert reason in skips[row], skips[row]
    assert f"warning: {len(bad)} rows or events skipped" in done.stderr


def test_replay_since_with_a_bad_duration_names_it(env: Env) -> None:
    config = setup_users(env)
    done = run_cli("replay", "--since", "soon", "--config", str(config))
    assert done.returncode == 2
    assert "--since: 'soon' is not a duration" in done.stderr
    assert "Traceback" not in done.stderr


def test_history_is_kept_for_replay_history_then_pruned(env: Env, spawn: Spawn) -> None:
    """Kept: a replay finds it. Past replay_history: gone from PostgreSQL."""
    config = setup_users(env, rows=len(ROWS), replay_history="2s")
    listener = spawn(config)
    r = env.redis()
    cache(r, ROWS)
    edit_every_row(env)
    wait_until(lambda: cached(r) == 0, what="the edit's keys deleted")
    table = "history_v1" if env.logical else "queue_v1"
    # (logical mode writes it behind the loop: maybe just after the deletes)
    wait_until(
        lambda: env.scalar(f"SELECT count(*) FROM cdc_invalidator.{table}") > 0,
        what="the edit's history kept",
    )
    wait_until(
        lambda: env.scalar(f"SELECT count(*) FROM cdc_invalidator.{table}") == 0,
        what="the history pruned after replay_history",
    )
    stop_listener(listener)


@pytest.mark.parametrize("capture", ["trigger"])  # progress_v1 is trigger mode's
def test_saved_positions_past_replay_history_are_pruned_but_the_newest_of_them(
    env: Env,
) -> None:
    """prune.sql: progress_v1 rows older than replay_history go, except the newest of
    them, where a window starting at the cutoff begins."""
    setup_users(env)
    env.sql(
        "INSERT INTO cdc_invalidator.progress_v1 (at, snapshot)"
        " SELECT now() - g * interval '1 min', '1:1:' FROM unnest('{1, 5, 10, 20}'::int[]) g"
    )
    with env.connect() as conn:
        conn.execute(
            Q.PRUNE.sql,
            {"snapshot": "1:1:", "after_xid": "0", "after_id": 0, "limit": 10, "keep_s": 7 * 60},
        )
        left = conn.execute(
            "SELECT array_agg(extract(epoch FROM now() - at)::int / 60 ORDER BY at)"
            " FROM cdc_invalidator.progress_v1"
        ).fetchone()
    assert left == ([10, 5, 1],)  # 20 went; 10, the newest past the cutoff, stays


@pytest.mark.parametrize("capture", ["trigger"])  # the queue is trigger mode's
def test_pruning_goes_on_past_its_last_chunk_not_through_rows_an_old_snapshot_keeps(
    env: Env,
) -> None:
    """prune.sql: while a transaction older than the pruned rows stays open (a pg_dump,
    a report), vacuum keeps them. Each chunk must be looked for past the last row the
    chunk before deleted, not from the table's start through all of them again: the
    listener prunes in its loop, every second."""
    setup_users(env)
    pg = PgConnector(env.dsn, application_name="test-prune", connect_timeout_s=5)
    queue = TriggerCapture(pg, prune_every_s=0).connect()  # replay_history 0
    retention = queue._retention
    old = env.connect()
    try:
        old.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        old.execute("SELECT 1")  # its snapshot: vacuum keeps whatever is deleted after
        # Single-row statements: a queue row each.
        env.sql(
            "DO $$ BEGIN FOR i IN 1..20000 LOOP INSERT INTO users VALUES (i, 'x'); END LOOP; END $$"
        )
        with env.connect() as conn:
            last = conn.execute(
                "SELECT xid::text::int8, id FROM cdc_invalidator.queue_v1"
                " ORDER BY xid DESC, id DESC LIMIT 1"
            ).fetchone()

        def drained() -> bool:  # read, saved, then pruned chunk after chunk
            return read_and_saved(env, queue) and queue_rows(env) == 0

        wait_until(drained, what="the queue processed and pruned")
        assert retention.pruned_to == last  # where the next chunk is looked for
        pages = env.scalar("SELECT pg_relation_size('cdc_invalidator.queue_v1') / 8192")
        assert pages > 100  # the deleted rows, kept for the old snapshot

        env.sql("INSERT INTO users VALUES (0, 'x')")
        wait_until(drained, what="one more change processed and pruned")
        # What a chunk costs now, past that position and from the start (what every chunk
        # read before).
        done = queue._progress.saved_done.text

        def blocks(after: tuple[int, int]) -> int:
            return queue_blocks_read(
                env,
                Q.PRUNE.text,
                {
                    "snapshot": done,
                    "after_xid": str(after[0]),
                    "after_id": after[1],
                    "limit": 5000,
                    "keep_s": 0,
                },
            )

        assert blocks(retention.pruned_to) < 20
        assert blocks((0, 0)) > pages / 2
    finally:
        old.close()
        queue.close()


def queue_rows(env: Env) -> int:
    """Trigger mode: the queue's rows, processed or not (what pruning leaves)."""
    return int(env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1"))


def no_sweep(works: Routed) -> Ticket:
    """RedisWatch's sweep_later where the history holds no TRUNCATE."""
    pytest.fail(f"nothing to sweep: {works}")


def test_a_replay_reads_the_history_only_once_settled(env: Env) -> None:
    """Logical mode writes the history behind the loop: a replay must first settle it
    (the runner passes the source's settle), or the keys of a batch whose history was
    still queued would not be deleted again after a restore."""
    settings = load_settings(setup_users(env, rows=1, second_delete_ms=0))
    mode = mode_for(settings)
    order: list[str] = []

    class Recorded:
        history_table = mode.history_table

        def history(
            self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
        ) -> Iterator[Decoded]:
            order.append("read")
            return mode.history(conn, since_s, map_pack)

        def acknowledged(
            self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
        ) -> Iterator[Decoded]:
            order.append("read acknowledged")
            return mode.acknowledged(conn, since_s, map_pack)

        def last_acknowledged_s(self, conn: psycopg.Connection[Any]) -> float | None:
            return mode.last_acknowledged_s(conn)

        def eras(self, conn: psycopg.Connection[Any]) -> list[Era]:
            return mode.eras(conn)

    with env.connect() as conn:
        IdentityStore(conn).save("a server that is gone")
    watch = RedisWatch(
        sink=RedisSink(env.redis()),
        mapper=settings.mapper(),
        history=Recorded(),
        connect=env.connect,
        window_s=60,
        check_every_s=1,
    )
    assert (
        watch.check(
            sweep_later=no_sweep,
            force=True,
            settle=lambda: order.append("settle"),
            before_rendering=lambda: order.append("file"),
        )
        is not None
    )
    # The runner's look at its configuration file comes before the mapping renders.
    assert order == ["settle", "file", "read"]


def changed_file() -> None:
    """RedisWatch's before_rendering where the configuration file holds other tables."""
    raise ConfigurationChanged("the configuration file's tables changed")


def test_a_replay_or_a_redo_renders_nothing_once_the_file_changed(env: Env) -> None:
    """The watch raises what the runner's look at the file raised, before it renders: the
    replay (or the redo of a predecessor's second deletes) is done by the listener
    started with the file, since neither was saved."""
    settings = load_settings(setup_users(env, rows=1, second_delete_ms=0))

    def watch(second_delete_s: float) -> RedisWatch:
        return RedisWatch(
            sink=RedisSink(env.redis()),
            mapper=settings.mapper(),
            history=mode_for(settings),
            connect=env.connect,
            window_s=60,
            check_every_s=1,
            second_delete_s=second_delete_s,
        )

    with env.connect() as conn:
        IdentityStore(conn).save("a server that is gone")
    with pytest.raises(ConfigurationChanged):
        watch(0.0).check(sweep_later=no_sweep, force=True, before_rendering=changed_file)
    with env.connect() as conn:
        saved = IdentityStore(conn).load()
    assert saved is not None
    assert saved[0] == "a server that is gone", "nothing replayed"

    # The server known: no replay, only the redo owed by a predecessor.
    with env.connect() as conn:
        IdentityStore(conn).save(identity_of(RedisSink(env.redis()).states()))
    assert watch(0.0).check(sweep_later=no_sweep, force=True, before_rendering=changed_file) is None
    with pytest.raises(ConfigurationChanged):
        watch(0.3).check(sweep_later=no_sweep, force=True, before_rendering=changed_file)


def test_a_replay_refused_a_session_waits_for_the_next_check(env: Env) -> None:
    """PostgreSQL refuses the watch's session (max_connections reached, say): the check
    says so and returns, leaving the listener's own sessions alone (an error here closed
    them, and every invalidation waited for a free connection); the next check replays."""
    settings = load_settings(setup_users(env, rows=1, second_delete_ms=0))
    with env.connect() as conn:
        IdentityStore(conn).save("a server that is gone")
    refused = [psycopg.OperationalError("FATAL: sorry, too many clients already")]

    def connect() -> psycopg.Connection[Any]:
        if refused:
            raise refused.pop()
        return env.connect()

    watch = RedisWatch(
        sink=RedisSink(env.redis()),
        mapper=settings.mapper(),
        history=mode_for(settings),
        connect=connect,
        window_s=60,
        check_every_s=0.1,
    )
    assert watch.check(sweep_later=no_sweep, force=True) is None
    assert watch.check(sweep_later=no_sweep, force=True) is not None, "replayed at the next check"


# history_v1 refusing every INSERT as a full disk does (the connection stays usable).
FULL_DISK = """
CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
END
$$;
CREATE TRIGGER full_disk BEFORE INSERT ON cdc_invalidator.history_v1
    FOR EACH ROW EXECUTE FUNCTION full_disk();
"""


@pytest.mark.parametrize("capture", ["logical"])  # trigger mode's history is the queue
def test_a_batch_whose_history_was_not_written_comes_again_from_the_slot(env: Env) -> None:
    """Its keys were deleted, but a replay could not find them: the slot must send the
    change again. The stream whose history write failed confirms nothing more, not even
    when the runner closes it (its connection still works)."""
    config = setup_users(env, rows=1, replay_history="1h", second_delete_ms=0)
    env.sql(FULL_DISK)
    with listening(config) as listener:
        runner = listener.runner
        env.sql("UPDATE users SET email = 'new1@x' WHERE id = 1")
        # Each failure is a stream closed and opened again: the second one, a change
        # sent again (a stream that confirmed it on close would be sent nothing).
        wait_until(lambda: runner.postgres.failures >= 2, what="the history write failing twice")
        env.sql("DROP TRIGGER full_disk ON cdc_invalidator.history_v1")
        wait_until(
            lambda: (
                env.scalar(
                    "SELECT count(*) FROM cdc_invalidator.history_v1"
                    " WHERE strpos(events::text, 'new1@x') > 0"
                )
                == 1
            ),
            what="the change sent again, its history written",
        )


def stale_set_after_the_first_delete(
    env: Env, spawn: Spawn, second_delete_ms: int
) -> tuple[ListenerProcess, redis.Redis]:
    """A change is invalidated; then a slow reader, who read the old row before the
    commit, caches it."""
    listener = spawn(setup_users(env, rows=2, second_delete_ms=second_delete_ms))
    r = env.redis()
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    cache(r, [1])
    env.sql("UPDATE users SET email = 'later@x' WHERE id = 1")
    wait_until(lambda: r.exists("user:1") == 0, what="the first delete")
    r.set("user:1", "stale")
    return listener, r


def test_second_delete_undoes_a_stale_set_after_the_first(env: Env, spawn: Spawn) -> None:
    listener, r = stale_set_after_the_first_delete(env, spawn, 300)
    wait_until(lambda: r.exists("user:1") == 0, what="the second delete")
    stopped = stop_listener(listener)
    assert stopped["keys_deleted_again"] >= 1


def test_a_backlog_deleted_after_the_readers_bound_owes_no_second_delete(
    env: Env, spawn: Spawn
) -> None:
    """A stale SET lands at most second_delete_ms after the change became visible: a
    first delete later than that came after every such SET. A backlog the listener finds
    at its start is deleted (Redis holds the delete) more than second_delete_ms after it
    was visible: it owes none; a change made while it runs does."""
    config = setup_users(env, rows=2, second_delete_ms=1000)
    r = env.redis()
    cache(r, [1, 2])
    env.sql("UPDATE users SET email = 'backlog@x' WHERE id = 1")  # no listener yet
    r.client_pause(30_000, all=False)
    try:
        listener = spawn(config)
        wait_until(lambda: blocked_on_redis(r), what="the backlog's UNLINK held")
        # The one sleep here: the time under test, a hold longer than second_delete_ms.
        time.sleep(1.1)
    finally:
        r.client_unpause()
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the backlog's delete")
    r.set("user:1", "after the readers' bound")  # no reader of the old row can do this
    cache(r, [2])
    env.sql("UPDATE users SET email = 'live@x' WHERE id = 2")
    wait_until(lambda: r.exists(*keys_of(2)) == 0, what="the live change's first delete")
    r.set("user:2", "stale")  # a slow reader's, within second_delete_ms
    stopped = stop_listener(listener)  # does the second deletes owed, at once
    assert r.get("user:1") == "after the readers' bound", "the backlog owed no second delete"
    assert r.exists("user:2") == 0, "the live change's second delete"
    assert stopped["keys_deleted_again"] == 1


# --- the window, from the server's own settings --------------------------------------


@pytest.fixture
def redis_config(env: Env) -> Iterator[redis.Redis]:
    r = env.redis()
    saved = {k: str(r.config_get(k)[k]) for k in ("save", "appendonly", "appendfsync")}
    yield r
    for key, value in saved.items():
        r.config_set(key, value)


@pytest.mark.parametrize(
    ("settings", "window", "why"),
    [
        ({"save": "3600 1 300 100 60 10000", "appendonly": "no"}, 3600, "RDB snapshots"),
        ({"save": "", "appendonly": "yes", "appendfsync": "everysec"}, 2, "everysec"),
        ({"save": "900 1", "appendonly": "yes", "appendfsync": "always"}, 0, "always"),
        ({"save": "", "appendonly": "yes", "appendfsync": "no"}, 30, "appendfsync no"),
        ({"save": "", "appendonly": "no"}, 0, "no persistence"),
    ],
)
def test_persistence_window_follows_the_server_settings(
    redis_config: redis.Redis, settings: dict[str, str], window: float, why: str
) -> None:
    for key, value in settings.items():
        redis_config.config_set(key, value)
    got, reason = persistence_window(RedisSink(redis_config).persistence())
    assert (got, why in reason) == (window, True), reason


def test_persistence_window_without_config_permission_assumes_an_hour(env: Env) -> None:
    admin = env.redis()
    admin.acl_setuser("replayer", enabled=True, passwords=["+pw"], keys=["*"], commands=["+info"])
    try:
        limited = redis.Redis.from_url(
            env.redis_url.replace("redis://", "redis://replayer:pw@"), decode_responses=True
        )
        window, reason = persistence_window(RedisSink(limited).persistence())
        assert window == UNKNOWN_PERSISTENCE_S
        assert "CONFIG GET refused" in reason
        assert "set replay_window" in reason
    finally:
        admin.acl_deluser("replayer")


@pytest.mark.parametrize("capture", ["trigger"])  # Redis's alone
def test_persistence_window_without_persistence_but_a_snapshot_loaded_assumes_an_hour() -> None:
    """save "" and appendonly no: Redis still loads the dump.rdb it finds as it starts
    (a backup restored by hand, an earlier SAVE's), of an age nobody can tell."""
    with RedisServer.create() as server:
        r = server.client()
        assert persistence_window(RedisSink(r).persistence())[0] == 0, "started empty"
        r.mset({"user:1": "cached", "user:2": "cached"})
        r.save()
        server.kill()
        server.start()
        window, reason = persistence_window(RedisSink(server.client()).persistence())
        assert window == UNKNOWN_PERSISTENCE_S
        assert "no persistence configured, but the server loaded 2 keys" in reason
        assert "set replay_window" in reason


def test_stopping_does_the_second_deletes_still_owed(env: Env, spawn: Spawn) -> None:
    listener, r = stale_set_after_the_first_delete(env, spawn, 60_000)
    # Not due for a minute. Each turn of the loop first does the second deletes due by
    # then: a turn for a later change, a second on, must leave user:1 alone. (The one
    # sleep here: a second delete due too early, 60 ms for 60 s, must have come due.)
    time.sleep(1.0)
    cache(r, [2])
    env.sql("UPDATE users SET email = 'other@x' WHERE id = 2")
    wait_until(lambda: r.exists(*keys_of(2)) == 0, what="a later change's delete")
    assert r.get("user:1") == "stale", "not due for a minute"
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
    assert r.exists("user:1") == 0, "the second delete was done on the way out"
    (stopped,) = listener.logged("listener_stopped")
    assert stopped["keys_deleted_again"] == 1, "on the way out, and only then: the stale SET"


def test_check_reports_how_far_replay_reaches_and_warns_when_history_is_short(
    env: Env, redis_config: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    config = setup_users(env, replay_history="1h")
    redis_config.config_set("save", "900 1")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ok: replay after a Redis restart reaches back 15m (RDB snapshots (save '900 1'))" in out

    redis_config.config_set("save", "86400 1")
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: replay after a Redis restart reaches back 24h" in out
    assert "replay_history keeps only 1h: raise replay_history" in out


def test_a_replay_reads_the_history_in_rounds_of_bounded_size(
    env: Env, spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long window must not be read into memory at once. Logical mode's history rows
    are whole acknowledged batches (up to batch_size events each): a round is cut by
    events, not by rows (it was 20,000 rows: millions of events)."""
    config = setup_users(env, rows=120, replay_history="1h")
    listener = spawn(config)
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    for start in range(1, 121, 10):  # 12 transactions, each acknowledged on its own
        ids = range(start, start + 10)
        written = write(
            env,
            f"UPDATE users SET email = 'x' || id WHERE id BETWEEN {start} AND {ids[-1]}",
            ids=ids,
        )
        wait_until(partial(acknowledged, env, written), what="the transaction acknowledged")
    stop_listener(listener)

    mode = mode_for(load_settings(config))
    monkeypatch.setattr(trigger_mode, "HISTORY_CHUNK", 25)  # trigger mode: events per round
    monkeypatch.setattr(logical_mode, "HISTORY_CHUNK", 25)  # logical mode: events per round
    monkeypatch.setattr(logical_mode, "HISTORY_BATCH_ROWS", 1)
    with env.connect() as conn:
        rounds = [len(chunk.events) for chunk in mode.history(conn, 3600)]
    assert sum(rounds) == 120, rounds
    # Each round stops once it holds 25 events: at most 25 + one batch (10 events here).
    assert len(rounds) >= 4, rounds
    assert max(rounds) <= 25 + 10, rounds


@pytest.mark.parametrize("capture", ["trigger"])  # logical mode follows relations by OID
def test_replay_since_takes_rows_of_a_table_renamed_and_configured_so(
    env: Env, spawn: Spawn
) -> None:
    """Rows invalidated under the table's old name, replayed after the table was renamed
    and the configuration (and install) followed: replayed under the new name, none
    skipped."""
    config, r = invalidated_then_stopped(env, spawn)
    env.sql("ALTER TABLE users RENAME TO members")
    renamed = config.with_name("renamed.toml")
    renamed.write_text(config.read_text().replace('"public.users"', '"public.members"'))
    assert '"public.members"' in renamed.read_text()
    assert main(["install", "--config", str(renamed)]) == 0

    cache(r, ROWS)
    r.set(BYSTANDER, "fresh")
    done = replay_deletes_every_row_again(renamed, "15m")
    assert "skipped" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert cached(r) == 0
    assert r.get(BYSTANDER) == "fresh"


def test_replay_since_renders_rows_invalidated_under_replaced_templates_with_them_too(
    env: Env, spawn: Spawn
) -> None:
    """Rows invalidated under user:{id} and user:email:{email}; then install replaced
    users' templates by member:{id}; a backup from before the edit restored. `replay
    --since` on the new file deleted member:N only, and the restored user:N and
    user:email:... stayed (both modes, PostgreSQL 15): the old app's keys. Now a replay
    renders the changes of a table whose templates an install replaced with the earlier
    ones too (the column only they use included)."""
    config, r = invalidated_then_stopped(env, spawn)
    replaced = config.with_name("replaced.toml")
    text = config.read_text()
    old = 'keys = ["user:{id}", "user:email:{email}"]'
    assert old in text
    replaced.write_text(text.replace(old, 'keys = ["member:{id}"]'))
    assert main(["install", "--config", str(replaced)]) == 0

    cache(r, ROWS)
    r.mset({f"member:{i}": "stale" for i in ROWS})
    r.set(BYSTANDER, "fresh")
    done = run_cli("replay", "--since", "15m", "--config", str(replaced))
    assert done.returncode == 0, done.stderr
    assert f"{3 * len(ROWS)} keys were back and are deleted again" in done.stdout, done.stdout
    assert cached(r) == 0
    assert r.exists(*(f"member:{i}" for i in ROWS)) == 0
    assert r.get(BYSTANDER) == "fresh"
