"""A second listener on the same database waits as a standby and takes over.

Both capture modes: the first listener holds the trigger queue's advisory lock, or
streams the replication slot (which one process at a time may do).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import psycopg
import pytest

from cdc_invalidator.capture import keepalive
from tests.support.config import write_config
from tests.support.env import FAST_PG, Env, Servers, capture_of, make_env, pg_of, redis_of
from tests.support.evidence import unavailable
from tests.support.faults import SLOT, TEMPLATES, cache, changed_and_deleted, keys_of, setup_users
from tests.support.listener import ListenerProcess, run_cli
from tests.support.netns import NoNamespaces, VanishingHost
from tests.support.servers import PostgresServer, RedisServer
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


def test_a_listener_pointed_at_a_standby_waits_for_its_promotion(
    own_env: Env, tmp_path: Path
) -> None:
    """After a failover, database_url may still reach a standby (DNS, a virtual IP not
    moved yet, the old primary come back as one). It takes no writes: the listener
    waits and retries as for a server down, instead of exiting (a restart loop under
    systemd or Kubernetes), and goes on once the server is promoted."""
    config = setup_users(own_env, rows=3)
    standby = PostgresServer.standby_of(pg_of(own_env))
    try:
        dbname = own_env.dsn.rsplit("/", 1)[1]
        text = config.read_text()
        config.write_text(text.replace(own_env.dsn, standby.dsn(dbname)))
        assert standby.dsn(dbname) in config.read_text()
        listener = ListenerProcess(config, tmp_path / "listener.log").start()
        try:
            wait_until(lambda: listener.logged("postgres_unavailable"), what="the wait")
            error = listener.logged("postgres_unavailable")[0]["error"]
            assert "InRecovery: the server (127.0.0.1:" in error, error
            assert "is a standby, in recovery" in error
            assert listener.process is not None
            assert listener.process.poll() is None, "still running, not exited"
            standby.promote()
            wait_until(lambda: listener.logged("postgres_available"), what="the promotion seen")
            r = own_env.redis()
            changed_and_deleted(r, standby.dsn(dbname), 1, "a change on the promoted server")
            listener.signal(signal.SIGTERM)
            assert listener.wait() == 0
        finally:
            listener.kill()
    finally:
        standby.destroy()


def test_check_and_status_on_a_standby_say_it_is_one(own_env: Env) -> None:
    """`check` pointed at a hot standby by mistake passed (exit 0) in trigger mode, its
    one hint a warning that the server withholds its system identifier or timeline; in
    logical mode it said the slot was gone and that the listener would make it again
    (it cannot, on a standby); `status` in logical mode said only "recovery is in
    progress". Both now say the server is a standby and to point database_url at the
    primary, and exit 1."""
    config = setup_users(own_env, rows=1)
    standby = PostgresServer.standby_of(pg_of(own_env))
    try:
        dbname = own_env.dsn.rsplit("/", 1)[1]
        config.write_text(config.read_text().replace(own_env.dsn, standby.dsn(dbname)))
        done = run_cli("check", "--config", str(config))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "is a standby, in recovery" in done.stderr, done.stderr
        assert "withholds" not in done.stdout + done.stderr
        assert "is gone" not in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        status = run_cli("status", "--config", str(config))
        if own_env.logical:
            assert status.returncode == 1, status.stdout + status.stderr
            assert "is a standby, in recovery" in status.stderr, status.stderr
        else:  # (the queue came with the data: its backlog is there to read)
            assert status.returncode == 0, status.stdout + status.stderr
        assert "Traceback" not in status.stdout + status.stderr
    finally:
        standby.destroy()


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


# --- a host that vanishes: no FIN, no RST, its link just goes ----------------------------

# Each session's keepalives (capture/keepalive.py): the first probe after `idle` s of
# silence, then one every `interval` s, the session ended after `count` unanswered.
KEEPALIVE = keepalive.SERVER_SETTINGS
SILENT_S = (
    KEEPALIVE["tcp_keepalives_idle"]
    + KEEPALIVE["tcp_keepalives_interval"] * KEEPALIVE["tcp_keepalives_count"]
)
# What the server sent the vanished host stays unacknowledged: the trigger listener's
# session ends after tcp_user_timeout; the walsender (which has none, see keepalive.py)
# after wal_sender_timeout, set low on this test's server (the docs say to, for a quicker
# takeover in logical mode).
WAL_SENDER_TIMEOUT_S = 4
POLL_S = 1.0  # the standby's poll_interval_ms (the default)
# A loaded 2-core test machine: scheduling, the standby's connection, the log line.
MARGIN_S = 1.5


@pytest.fixture
def vanishing_host() -> Iterator[VanishingHost]:
    try:
        host = VanishingHost.create()
    except NoNamespaces as exc:
        unavailable(f"cannot make a network namespace here: {exc}")
    try:
        yield host
    finally:
        host.remove()


@pytest.fixture
def reachable_env(
    vanishing_host: VanishingHost, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Env]:
    """A PostgreSQL and a Redis of the test's own, listening on loopback and on the
    vanishing host's link too."""
    address = vanishing_host.host_address
    pg = PostgresServer.create(
        {
            **FAST_PG,
            "listen_addresses": f"'127.0.0.1,{address}'",
            "wal_sender_timeout": f"'{WAL_SENDER_TIMEOUT_S}s'",
        }
    )
    with (pg.datadir / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {vanishing_host.network} trust\n")
    rd = RedisServer.create(["--bind", "127.0.0.1", address])
    with pg, rd:
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        servers = Servers(pg.dsn, rd.url, pg, rd)
        yield from make_env(servers, tmp_path, dbname="app", capture=capture_of(request))


def holder_pid(env: Env) -> int | None:
    """The backend holding the source: the advisory lock's, or the slot's walsender."""
    if env.logical:
        query = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s"
        return cast(int | None, env.scalar(query, [SLOT]))
    query = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    return cast(int | None, env.scalar(query))


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.parametrize("writes", ["quiet", "writing"])
def test_a_vanished_hosts_lock_or_slot_goes_to_the_standby(
    reachable_env: Env, vanishing_host: VanishingHost, tmp_path: Path, writes: str
) -> None:
    """The active listener's host loses its link: its sessions fall silent, nothing
    closes them. The server ends them (keepalives; tcp_user_timeout or
    wal_sender_timeout once it has sent something that is never acknowledged), and the
    standby takes over within that bound and its next poll; every change made meanwhile
    is invalidated."""
    env, host = reachable_env, vanishing_host
    n = 400
    config = setup_users(env, rows=n, poll_interval_ms=int(POLL_S * 1000))
    there = host.host_address
    pg_port, redis_port = pg_of(env).port, redis_of(env).port
    remote = write_config(
        tmp_path / "remote.toml",
        database_url=f"postgresql://postgres@{there}:{pg_port}/app",
        redis_url=f"redis://{there}:{redis_port}/0",
        tables={"public.users": TEMPLATES},
        poll_interval_ms=int(POLL_S * 1000),
        **({"capture": "logical"} if env.logical else {}),
    )
    r = env.redis()
    cache(r, range(1, n + 1))
    first = ListenerProcess(remote, tmp_path / "first.log", prefix=host.prefix)
    second = ListenerProcess(config, tmp_path / "second.log")
    try:
        first.start()
        wait_until(lambda: holder_pid(env) is not None, what="the remote listener holding")
        held_by = holder_pid(env)
        client = env.scalar(
            "SELECT host(client_addr) FROM pg_stat_activity WHERE pid = %s", [held_by]
        )
        assert client == host.guest_address, "the holder is the listener on the vanishing host"
        second.start()
        wait_until(lambda: second.logged("standby"), what="the local listener in standby")
        env.sql("UPDATE users SET email = 'a@y' WHERE id = 1")
        wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the remote listener deleting")

        host.vanish()
        vanished_at = time.monotonic()
        written = [1]

        def write_one() -> None:
            i = written[-1] + 1
            if i <= n:
                env.sql(f"UPDATE users SET email = 'b{i}@y' WHERE id = {i}")
                written.append(i)

        def taken_over() -> bool:
            if writes == "writing":
                write_one()  # changes keep coming: one per poll of this wait
            return bool(second.logged("active"))

        wait_until(taken_over, timeout_s=60, what="the standby taking over")
        took_s = time.monotonic() - vanished_at
        bound_s: float = SILENT_S
        if writes == "writing":
            bound_s = WAL_SENDER_TIMEOUT_S if env.logical else keepalive.USER_TIMEOUT_MS / 1000
        assert took_s <= bound_s + POLL_S + MARGIN_S, (
            f"{writes}: the standby took over {took_s:.1f} s after the host vanished"
        )
        assert held_by not in listener_pids(env), "the vanished host's session was ended"
        assert holder_pid(env) not in (None, held_by)
        if writes == "writing":
            assert len(written) > 2, "changes were written while the host was gone"
        wait_until(
            lambda: r.exists(*[k for i in written for k in keys_of(i)]) == 0,
            what="every change made while the host vanished deleted",
        )
        untouched = range(written[-1] + 1, n + 1)
        assert r.exists(*[k for i in untouched for k in keys_of(i)]) == 2 * len(untouched)
    finally:
        first.kill()
        second.kill()
