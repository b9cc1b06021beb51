"""A second listener on the same database waits as a standby and takes over.

Both capture modes: the first listener holds the trigger queue's advisory lock, or
streams the replication slot (which one process at a time may do).
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.support.env import Env
from tests.support.faults import SLOT, cache, keys_of, setup_users
from tests.support.listener import ListenerProcess
from tests.support.waits import wait_until

pytestmark = pytest.mark.usefixtures("capture")


def holding(env: Env) -> bool:
    """A listener holds the source: the queue's advisory lock, or the slot."""
    if env.logical:
        return bool(
            env.scalar(
                "SELECT active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = %s",
                [SLOT],
            )
        )
    return bool(env.scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"))


def test_second_listener_waits_then_takes_over(own_env: Env, tmp_path: Path) -> None:
    config = setup_users(own_env, rows=10)
    r = own_env.redis()
    first = ListenerProcess(config, tmp_path / "first.log").start()
    second = ListenerProcess(config, tmp_path / "second.log")
    try:
        # The first holds the queue's advisory lock (or the slot) before the second starts.
        wait_until(lambda: holding(own_env), what="the first listener holding the source")
        second.start()
        wait_until(lambda: second.logged("standby"), what="the second listener in standby")
        # It says what it waits for: the slot, with the process streaming it.
        reason = second.logged("standby")[0]["reason"]
        if own_env.logical:
            assert re.search(
                rf"replication slot .*{SLOT}.* (in use by process|active for PID) \d+", reason
            ), reason
        else:
            assert "another listener" in reason, reason
        cache(r, [1])
        own_env.sql("UPDATE users SET email = 'x@y' WHERE id = 1")
        wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the active listener's delete")
        assert not second.logged("active")

        first.signal(signal.SIGKILL)
        first.wait()
        # The lock (the slot) goes with the dead listener's session; the standby polls for it.
        wait_until(lambda: second.logged("active"), what="the standby taking over")
        cache(r, [2])
        own_env.sql("UPDATE users SET email = 'z@y' WHERE id = 2")
        wait_until(lambda: r.exists(*keys_of(2)) == 0, what="a delete after the takeover")
        assert len(second.logged("standby")) == 1  # one line, not one per poll
        second.signal(signal.SIGTERM)
        assert second.wait() == 0
    finally:
        first.kill()
        second.kill()


def listener_pids(env: Env) -> list[int]:
    """The backends of the consuming listener: its session (trigger mode), or the
    walsender and its side session (logical mode)."""
    with env.connect() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'cdc-invalidator'"
        ).fetchall()
    return [pid for (pid,) in rows]


@pytest.mark.parametrize("how", ["sigkill", "connection lost"])
def test_a_listener_consumes_again_within_5_s_and_nothing_is_lost(
    own_env: Env, tmp_path: Path, how: str
) -> None:
    """Two listeners, default poll interval; the active one dies or loses its
    connection while changes keep coming. Within 5 s one of them consumes again, and
    every change's keys are deleted."""
    n = 200
    config = setup_users(own_env, rows=n, poll_interval_ms=1000)
    r = own_env.redis()
    cache(r, range(1, n + 1))
    first = ListenerProcess(config, tmp_path / "first.log").start()
    wait_until(lambda: holding(own_env), what="the first listener holding the source")
    second = ListenerProcess(config, tmp_path / "second.log").start()
    try:
        wait_until(lambda: second.logged("standby"), what="the second listener in standby")
        own_env.sql("UPDATE users SET email = 'a' || id || '@y' WHERE id <= 50")
        wait_until(
            lambda: r.exists(*[k for i in range(1, 51) for k in keys_of(i)]) == 0,
            what="the first batch deleted",
        )
        if how == "sigkill":
            first.signal(signal.SIGKILL)
            first.wait()
        else:
            own_env.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'cdc-invalidator' AND pid = ANY(%s)",
                [listener_pids(own_env)],
            )
        lost_at = time.monotonic()
        # Changes during the handover, one transaction each.
        for i in range(51, n + 1, 10):
            own_env.sql(
                f"UPDATE users SET email = 'b' || id || '@y' WHERE id BETWEEN {i} AND {i + 9}"
            )
        wait_until(lambda: holding(own_env), what="a listener consuming again")
        wait_until(
            lambda: r.exists(*[k for i in range(51, n + 1) for k in keys_of(i)]) == 0,
            what="every change of the handover deleted",
        )
        took_s = time.monotonic() - lost_at
        assert took_s < 5.0, f"{how}: consuming again after {took_s:.2f} s"
        if how == "sigkill":
            assert second.logged("active"), "the standby took over"
    finally:
        first.kill()
        second.kill()
