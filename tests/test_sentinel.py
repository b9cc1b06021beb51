"""Redis Sentinel: the listener finds the master through sentinels and follows a failover.

Real processes: a master, a replica (`--replicaof`) and a sentinel (`--sentinel`, quorum
1); `SENTINEL FAILOVER` promotes the replica without waiting for a failure.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from cdc_invalidator.cli import main
from cdc_invalidator.sink import RedisSink, connect_sink
from cdc_invalidator.sink.connect import MasterWatch, RedisOptions, redis_client
from cdc_invalidator.sink.oversize import LEAST_LIMIT, bulk_limit, storable
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.evidence import unavailable
from tests.support.listener import ListenerProcess, ListenerThread, Spawn, run_cli
from tests.support.servers import RedisServer, ServerError
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.slow]

MASTER = "mymaster"


@dataclass
class SentinelSetup:
    first: RedisServer  # the master at the start
    second: RedisServer  # its replica, the master after the failover
    sentinel: RedisServer

    @cached_property
    def sentinel_client(self) -> redis.Redis:
        return self.sentinel.client(decode_responses=True)

    def master_port(self) -> int:
        """The master as SENTINEL MASTERS shows it, which is what redis-py asks (during a
        failover it names the new master after GET-MASTER-ADDR-BY-NAME does)."""
        masters: Any = self.sentinel_client.sentinel_masters()
        state = masters[MASTER]
        assert state["ip"] == "127.0.0.1"
        return int(state["port"])


def _role(server: RedisServer) -> dict[str, Any]:
    with server.client(decode_responses=True) as client:
        info: dict[str, Any] = client.info("replication")
    return info


def _replica_in_sync(server: RedisServer) -> bool:
    info = _role(server)
    return info["role"] == "slave" and info.get("master_link_status") == "up"


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    try:
        # (A master waits repl-diskless-sync-delay, 5 s, for more replicas before the
        # first sync: each test waited for it.)
        first = RedisServer.create(["--repl-diskless-sync-delay", "0"])
        second = RedisServer.create(["--replicaof", "127.0.0.1", str(first.port)])
    except ServerError as exc:
        unavailable(f"no redis-server: {exc}")
    sentinel = RedisServer.create_sentinel(first.port, master_name=MASTER)
    with first, second:
        wait_until(lambda: _replica_in_sync(second), what="the replica in sync")
        with sentinel:
            setup = SentinelSetup(first, second, sentinel)

            def replica_known() -> bool:
                replicas = setup.sentinel_client.sentinel_slaves(MASTER)
                return any(
                    int(r["port"]) == second.port
                    and r.get("master-link-status") == "ok"
                    and not r["is_sdown"]
                    for r in replicas
                )

            wait_until(replica_known, what="the sentinel knowing the replica")
            yield setup
            setup.sentinel_client.close()


def sentinel_config(env: Env, setup: SentinelSetup, name: str = "sentinel.toml") -> Path:
    path = write_config(
        env.tmp_path / name,
        database_url=env.dsn,
        # With sentinels, the URL's host and port are not used; its db (and user,
        # password and scheme) still are.
        redis_url="redis://ignored-with-sentinels/0",
        redis_sentinels=[f"127.0.0.1:{setup.sentinel.port}"],
        redis_sentinel_master=MASTER,
        tables={"public.users": ["user:{id}", "user:email:{email}"]},
        # The product's guarantee across a failover: a delete that reached the old
        # master in the second before the listener asked the sentinels again is
        # replayed on the new one, from this history (the tests' default keeps none).
        replay_history="15m",
    )
    assert main(["install", "--config", str(path)]) == 0
    return path


def user_1_watched(
    env: Env, setup: SentinelSetup, spawn: Spawn
) -> tuple[ListenerProcess, redis.Redis, redis.Redis]:
    """users with row 1, a listener through the sentinel, and clients of both servers."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text); INSERT INTO users VALUES (1, 'a')"
    )
    listener = spawn(sentinel_config(env, setup))
    first = setup.first.client(decode_responses=True)
    second = setup.second.client(decode_responses=True)
    return listener, first, second


def test_listener_follows_a_failover(env: Env, sentinel_setup: SentinelSetup) -> None:
    setup = sentinel_setup
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text); INSERT INTO users VALUES (1, 'a')"
    )
    config = sentinel_config(env, setup)
    first = setup.first.client(decode_responses=True)
    second = setup.second.client(decode_responses=True)
    first.mset({"user:1": "A", "user:email:a": "1"})
    listener = ListenerThread.from_file(config).start()
    try:
        env.sql("UPDATE users SET email = 'b' WHERE id = 1")
        wait_until(lambda: first.exists("user:1", "user:email:a") == 0, what="deleted on master")
        first_run_id = listener.sink.sink.client.info("server")["run_id"]
        assert first_run_id == first.info("server")["run_id"]

        assert setup.sentinel_client.sentinel_failover(MASTER)
        wait_until(
            lambda: setup.master_port() == setup.second.port,
            what="the sentinels naming the new master",
        )
        wait_until(lambda: _role(setup.second)["role"] == "master", what="the replica promoted")
        # Not waiting for the old master's demotion (Sentinel takes up to ~20 s for it):
        # until then it still takes writes, and the listener must have moved anyway.
        first.set("user:1", "old master")

        # A change after the failover: its keys are deleted on the NEW master.
        second.mset({"user:1": "stale", "user:email:b": "1", "user:email:c": "-"})
        env.sql("UPDATE users SET email = 'c' WHERE id = 1")
        wait_until(
            lambda: second.exists("user:1", "user:email:b", "user:email:c") == 0,
            what="deleted on the new master",
        )
        # The failover is an identity change the sink can see (replay reads run_id).
        assert listener.sink.sink.client.info("server")["run_id"] == second.info("server")["run_id"]
        assert listener.sink.sink.client.info("server")["run_id"] != first_run_id
        assert listener.alive()
        assert listener.runner.redis.available
    finally:
        listener.stop()
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 0, out.stderr


def test_a_quiet_listener_notices_a_failover_and_replays(
    env: Env, sentinel_setup: SentinelSetup, spawn: Spawn
) -> None:
    """No change after the failover: the periodic identity check asks the sentinels too,
    so the listener moves to the new master (and replays) within seconds, not when
    Sentinel gets round to demoting the old master."""
    setup = sentinel_setup
    listener, first, second = user_1_watched(env, setup, spawn)
    first.set("user:1", "A")
    env.sql("UPDATE users SET email = 'b' WHERE id = 1")
    wait_until(lambda: first.exists("user:1") == 0, what="deleted on the master")
    # Everything the master wrote has reached the replica (WAIT asks it at once). Not
    # "user:1 is gone from it": true too before the SET had replicated, and the UNLINK
    # arriving after the writes below deleted the stale keys before the failover.
    assert first.wait(1, 10_000) == 1
    # A replica promoted before our UNLINKs reached it: the stale keys are on it (written
    # on it directly, a writable replica keeps them through its promotion). Beside them,
    # keys no change invalidated, which a replay must leave.
    second.config_set("replica-read-only", "no")
    invalidated = ["user:1", "user:email:a", "user:email:b"]
    bystanders = {"user:2": "cached", "session:42": "fresh"}
    second.mset({**dict.fromkeys(invalidated, "stale"), **bystanders})
    assert setup.sentinel_client.sentinel_failover(MASTER)
    wait_until(lambda: setup.master_port() == setup.second.port, what="the new master named")
    named = time.monotonic()
    wait_until(lambda: listener.logged("redis_changed"), what="the failover noticed")
    assert time.monotonic() - named < 5.0
    (changed,) = listener.logged("redis_changed")
    second_run_id = second.info("server")["run_id"]
    assert changed["current"].startswith(second_run_id)
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    # Its effect on the new master: what was invalidated is gone, the rest is there.
    assert second.exists(*invalidated) == 0
    assert {key: second.get(key) for key in bystanders} == bystanders
    assert listener.logged("replay_done")[0]["existed"] == len(invalidated)
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


def deleted_past_a_cut_link(
    env: Env,
    setup: SentinelSetup,
    listener: ListenerProcess,
    first: redis.Redis,
    second: redis.Redis,
) -> float:
    """user:1's keys cached on both, the replica's link then cut (it may not resync:
    PSYNC refused, its connection killed), and the row changed: the listener's UNLINKs
    reach the master only. Returns when (time.monotonic()) they were seen done."""
    first.mset({"user:1": "stale", "user:email:a": "1"})
    assert first.wait(1, 10_000) == 1
    wait_until(lambda: listener.logged("redis_identity_recorded"), what="the listener started")
    first.execute_command("ACL", "SETUSER", "default", "-psync", "-sync")
    first.client_kill_filter(_type="replica")
    wait_until(lambda: not _replica_in_sync(setup.second), what="the link down")
    env.sql("UPDATE users SET email = 'b' WHERE id = 1")
    wait_until(lambda: first.exists("user:1", "user:email:a") == 0, what="deleted on the master")
    assert second.exists("user:1", "user:email:a") == 2, "the replica lags"
    return time.monotonic()


def test_a_replica_promoted_after_its_link_was_down_is_replayed_back_to_the_cut(
    env: Env, sentinel_setup: SentinelSetup, spawn: Spawn
) -> None:
    """The replica's link to the master is cut (it may not resync), the listener's
    UNLINKs go on reaching the master only, and seconds later the replica is promoted:
    it holds the stale keys. Its settings promise it loses nothing (AOF, fsync always),
    but it said where its copy of the old master's history ends (second_repl_offset):
    the replay reaches back to the last check that saw the master there."""
    setup = sentinel_setup
    listener, first, second = user_1_watched(env, setup, spawn)
    second.config_set("appendonly", "yes")
    second.config_set("appendfsync", "always")
    edited = deleted_past_a_cut_link(env, setup, listener, first, second)
    # The deletes must be older than the 5 s margin a failover is given anyway: a time
    # to let pass, not an event to wait on.
    time.sleep(max(0.0, edited + 7 - time.monotonic()))
    assert setup.sentinel_client.sentinel_failover(MASTER)
    wait_until(lambda: setup.master_port() == setup.second.port, what="the new master named")
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    assert second.exists("user:1", "user:email:a") == 0
    window = listener.logged("redis_changed")[0]["window"]
    assert "a replica promoted with the old master's writes up to offset" in window
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


def test_a_replica_restarted_from_its_aof_then_promoted_is_replayed_an_hour(
    env: Env, sentinel_setup: SentinelSetup, spawn: Spawn
) -> None:
    """The replica's link to the master is cut, the listener's UNLINKs reach the master
    only, and the replica restarts (a pod rescheduled) before it could resync: it loads
    its AOF, stale keys and all, and a replica restarted from an AOF forgets which
    master's history it holds (a new random master_replid, offset 0). Promoted, its
    master_replid2 is that random id, which no check saw: nothing says how far it lags,
    and its settings (AOF, fsync always) promise it loses nothing. The replay must reach
    back as far as for a history it cannot place (an hour), not the settings' seconds."""
    setup = sentinel_setup
    listener, first, second = user_1_watched(env, setup, spawn)
    second.config_set("appendonly", "yes")
    second.config_set("appendfsync", "always")
    wait_until(
        lambda: (
            second.info("persistence")["aof_rewrite_in_progress"] == 0
            and second.info("persistence")["aof_rewrite_scheduled"] == 0
        ),
        what="the replica's AOF written",
    )
    edited = deleted_past_a_cut_link(env, setup, listener, first, second)
    # The replica restarts from its AOF, still unable to resync.
    setup.second.kill()
    setup.second.args = [*setup.second.args, "--appendonly", "yes", "--appendfsync", "always"]
    setup.second.start()
    second.close()
    second = setup.second.client(decode_responses=True)
    assert second.exists("user:1", "user:email:a") == 2, "the stale keys loaded from its AOF"

    def replica_ok() -> bool:
        replicas = setup.sentinel_client.sentinel_slaves(MASTER)
        return any(int(r["port"]) == setup.second.port and not r["is_sdown"] for r in replicas)

    wait_until(replica_ok, what="the sentinel seeing the restarted replica")
    time.sleep(max(0.0, edited + 10 - time.monotonic()))
    assert setup.sentinel_client.sentinel_failover(MASTER)
    wait_until(lambda: setup.master_port() == setup.second.port, what="the new master named")
    wait_until(lambda: listener.logged("replay_done"), what="the replay")
    window = listener.logged("redis_changed")[0]["window"]
    assert second.exists("user:1", "user:email:a") == 0, window
    assert "a replica promoted from a history no check saw" in window
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


def test_an_unknown_master_name_is_reported(env: Env, sentinel_setup: SentinelSetup) -> None:
    config = write_config(
        env.tmp_path / "nope.toml",
        database_url=env.dsn,
        redis_url="redis://ignored/0",
        redis_sentinels=[f"127.0.0.1:{sentinel_setup.sentinel.port}"],
        redis_sentinel_master="nope",
        tables={"public.users": ["user:{id}"]},
    )
    env.sql("CREATE TABLE users (id int PRIMARY KEY)")
    assert main(["install", "--config", str(config)]) == 0
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 1
    assert "No master found for 'nope'" in out.stderr
    assert f"named by sentinels 127.0.0.1:{sentinel_setup.sentinel.port}" in out.stderr


def test_check_refuses_a_replica_named_as_the_server(
    env: Env, sentinel_setup: SentinelSetup
) -> None:
    """redis_url at a replica: every delete fails with READONLY (or, on a writable one,
    stays on it), and the backlog grows. check says so, not "reachable"."""
    config = write_config(
        env.tmp_path / "replica.toml",
        database_url=env.dsn,
        redis_url=f"redis://127.0.0.1:{sentinel_setup.second.port}/0",
        tables={"public.users": ["user:{id}"]},
    )
    env.sql("CREATE TABLE users (id int PRIMARY KEY)")
    assert main(["install", "--config", str(config)]) == 0
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 1
    assert "but a replica: its deletes fail (READONLY)" in out.stderr + out.stdout


def test_a_sentinel_that_drops_connections_is_passed_over_at_once(
    sentinel_setup: SentinelSetup,
) -> None:
    """The first sentinel listed accepts and at once closes every connection: the master
    is found through the second, after one connection to the first (redis-py's default
    retried it ten times, with back-off, at every master lookup)."""
    dropped = 0
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.05)
        stop = threading.Event()

        def drop_all() -> None:
            nonlocal dropped
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.close()
                dropped += 1

        dropper = threading.Thread(target=drop_all)
        dropper.start()
        try:
            options = RedisOptions(
                "redis://ignored-with-sentinels/0",
                sentinels=(
                    ("127.0.0.1", server.getsockname()[1]),
                    ("127.0.0.1", sentinel_setup.sentinel.port),
                ),
                sentinel_master=MASTER,
            )
            client = redis_client(options)
            try:
                assert client.ping()
                pool = client.connection_pool
                assert isinstance(pool, SentinelConnectionPool)
                assert pool.get_master_address() == ("127.0.0.1", sentinel_setup.first.port)
            finally:
                client.close()
        finally:
            stop.set()
            dropper.join()
    assert dropped == 1


def test_no_sentinel_answering_names_each_by_its_address() -> None:
    """When no sentinel names a master, the error lists each sentinel by its address with
    what it said, not by its client's repr (some thirty pool options and object addresses
    each: the listener logged that, and check printed it, the sentinel's reply lost in
    it)."""
    with socket.socket() as one, socket.socket() as two:
        for unused in (one, two):
            unused.bind(("127.0.0.1", 0))  # bound, not listening: connections refused
        ports = [one.getsockname()[1], two.getsockname()[1]]
        options = RedisOptions(
            "redis://ignored-with-sentinels/0",
            sentinels=tuple(("127.0.0.1", port) for port in ports),
            sentinel_master=MASTER,
            sentinel_password="its-secret",  # noqa: S106 - a test's, never printed
        )
        client = redis_client(options)
        try:
            with pytest.raises(redis.sentinel.MasterNotFoundError) as raised:
                client.ping()
        finally:
            client.close()
    message = str(raised.value)
    for port in ports:
        assert f"sentinel 127.0.0.1:{port} - " in message, message
    assert "Connection refused" in message, "each sentinel's own error is kept"
    assert "object at" not in message, message
    assert "ConnectionPool" not in message, message
    assert "its-secret" not in message


def test_every_pool_follows_the_master_the_identity_check_sees(
    sentinel_setup: SentinelSetup,
) -> None:
    """The loop's sink, a `redis_db` table's and the sweeper's each kept a pool that
    followed the master on its own clock: after a failover the identity check saw the
    new master and replayed, and for up to a second the others' deletes (the replay's
    own among them) went to the old master, whose resync then discarded them (a review:
    80-89 stale keys a failover). One watch moves every pool, and the identity check
    asks it first. (Its own clock set to an hour here: only that forced ask moves them.)"""
    setup = sentinel_setup
    options = RedisOptions(
        "redis://ignored-with-sentinels/0",
        sentinels=(("127.0.0.1", setup.sentinel.port),),
        sentinel_master=MASTER,
    )
    follow = MasterWatch(every_s=3600)
    loop = connect_sink(options, follow_master=follow)
    sweeper = connect_sink(options, follow_master=follow)
    assert isinstance(loop, RedisSink)
    assert isinstance(sweeper, RedisSink)
    other_db = loop.for_db(1)
    for sink in (loop, other_db, sweeper):
        sink.unlink(["warm"])  # a pooled connection each, to the first master
    first_run_id = loop.states()[0].run_id
    assert setup.sentinel_client.sentinel_failover(MASTER)
    wait_until(lambda: setup.master_port() == setup.second.port, what="the new master named")
    wait_until(lambda: _role(setup.second)["role"] == "master", what="the replica promoted")
    assert loop.states()[0].run_id not in ("", first_run_id)  # (the replay would start)
    with setup.second.client() as db0, setup.second.client(db=1) as db1:
        db0.set("user:1", "stale")
        db1.set("user:2", "stale")
        assert other_db.unlink(["user:2"]) == 1
        assert sweeper.unlink(["user:1"]) == 1
        assert (db0.exists("user:1"), db1.exists("user:2")) == (0, 0)
    for sink in (loop, sweeper):
        sink.close()


def test_a_long_key_the_master_takes_is_kept_where_config_is_refused(
    sentinel_setup: SentinelSetup,
) -> None:
    """Where CONFIG GET is refused, a key longer than 1 MiB is asked about on a
    connection of its own (sink/oversize.py): through Sentinel, the first draft's went
    to localhost:6379, not to the master, and the batch was retried for good (a review).
    The master takes the key (proto-max-bulk-len 4mb): it is kept."""
    master = sentinel_setup.first.client()
    master.config_set("proto-max-bulk-len", 4 * LEAST_LIMIT)
    master.acl_setuser(
        "noconfig", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-config"]
    )
    client = redis_client(
        RedisOptions(
            url="redis://noconfig:pw@ignored-with-sentinels/0",
            sentinels=(("127.0.0.1", sentinel_setup.sentinel.port),),
            sentinel_master=MASTER,
        )
    )
    long = "doc:name:" + "x" * (2 * LEAST_LIMIT)
    assert bulk_limit(client) is None
    assert storable(["short", long], None, client) == ["short", long]
    client.close()
    master.close()
