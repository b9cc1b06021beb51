"""Chaos, short: cache-aside readers, writers and one fault of each kind, then no stale key.

The engine is tests/support/chaos.py (its docstring says what runs and why the check is sound);
`make chaos` runs the long version. Both capture modes.
"""

from __future__ import annotations

import pytest

from tests.support.chaos import FAULTS, Chaos, Params
from tests.support.env import Env
from tests.support.faults import acknowledged, setup_users, write
from tests.support.listener import Spawn
from tests.support.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.servers, pytest.mark.usefixtures("capture")]


def test_no_stale_key_after_readers_writers_and_every_fault(own_env: Env) -> None:
    assert own_env.servers.pg is not None
    assert own_env.servers.redis is not None
    lines: list[str] = []
    chaos = Chaos(
        # One cycle: every fault kind once, in an order that varies with the seed.
        Params(capture=own_env.capture, rounds=len(FAULTS), round_s=3.0),
        pg=own_env.servers.pg,
        rd=own_env.servers.redis,
        dsn=own_env.dsn,
        workdir=own_env.tmp_path,
        say=lines.append,
    )
    report = chaos.run()
    summary = "\n".join([*lines, *report.lines()])

    assert report.stale == [], "\n".join(
        [summary, *(line for key in report.stale[:5] for line in chaos.explain(key))]
    )
    # The run did what it claims: every fault happened, the app read and wrote, the
    # cache was full of keys to check, and second deletes were at work.
    assert {kind: report.faults[kind] for kind in FAULTS} == dict.fromkeys(FAULTS, 1), summary
    assert report.writes > 200, summary
    assert report.sets > 200, summary
    assert report.keys_checked > 100, summary
    assert report.listener.get("keys_deleted_again", 0) > 0, summary

    # The check itself sees a stale key: one cached row, made older than the database's.
    r = chaos.redis_client()
    key = next(k for k in r.scan_iter("user:*") if r.get(k) != "null")
    r.set(key, '[0, "old@x", "old", 0]')
    assert chaos.check() == [key]


def test_the_check_finds_what_a_listener_without_replay_leaves(own_env: Env) -> None:
    """The control: with replay off, a Redis restored from its snapshot keeps the probe
    keys the listener had deleted after the SAVE, and the check reports every one."""
    assert own_env.servers.pg is not None
    assert own_env.servers.redis is not None
    chaos = Chaos(
        Params(
            capture=own_env.capture,
            rounds=1,
            round_s=1.0,
            replay_window="0s",
            faults=("redis_restore",),
        ),
        pg=own_env.servers.pg,
        rd=own_env.servers.redis,
        dsn=own_env.dsn,
        workdir=own_env.tmp_path,
        say=lambda _line: None,
    )
    report = chaos.run()
    probes = Chaos.probe_keys(0)
    assert set(probes) <= set(report.stale), report.lines()


def test_a_late_set_before_a_sigkill_is_undone_by_the_next_listener(env: Env, spawn: Spawn) -> None:
    """What the chaos run rarely meets, made deterministic: a reader read row 1 before a
    commit and SETs it after the first delete; the listener is killed before its second
    delete. The next listener redoes the second deletes its predecessor may have owed."""
    config = setup_users(env, rows=2, second_delete_ms=3000, replay_history="1h")
    first = spawn(config)
    r = env.redis()
    wait_until(lambda: first.logged("redis_identity_recorded"), what="the listener started")
    old = env.scalar("SELECT email FROM users WHERE id = 1")  # the slow reader's SELECT
    written = write(env, "UPDATE users SET email = 'new@x' WHERE id = 1", ids=range(1, 2))
    wait_until(lambda: acknowledged(env, written), what="the first delete, acknowledged")
    r.set("user:1", old)  # the reader's late SET
    first.kill()
    second = spawn(config)
    # The next listener at work: a later change to another row is invalidated.
    r.set("user:2", "u2@x")
    later = write(env, "UPDATE users SET email = 'b@x' WHERE id = 2", ids=range(2, 3))
    wait_until(lambda: acknowledged(env, later) and not r.exists("user:2"), what="row 2 done")
    second.kill()
    assert r.get("user:1") is None, "the late SET survived the listener's crash"
