"""Sentinel as production runs it: sentinels with a password (`requirepass` in
sentinel.conf), data nodes that take only ACL users with passwords, several live
sentinels, and (the `tls` runs) TLS everywhere.

Real processes: a master and its replica, each with the users the listener (`cdc`,
docs/redis.md's minimal ACL), the sentinels (`sentinel auth-user`) and replication
(`masteruser`) need and a default user that asks a password too; two sentinels, quorum
2, which find each other through the master and authenticate to each other with their
requirepass. In the `tls` runs every port is TLS only, replication and the sentinels'
own connections included (`tls-replication yes`), and clients must show a certificate.
Failovers both ways: forced (`SENTINEL FAILOVER`, asked of the sentinel the listener
lists second) and voted (the master killed, both sentinels agreeing it is down).
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from cdc_invalidator.cli import main
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.evidence import unavailable
from tests.support.listener import Spawn, run_cli
from tests.support.servers import RedisServer, RedisTls, ServerError, find_redis_server, free_port
from tests.support.tls import Certs, make_certs
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers, pytest.mark.slow]

MASTER = "mymaster"
# Made-up passwords, each of which must never be printed.
ADMIN_PASSWORD = "admin-s3cret"  # noqa: S105 - the data nodes' default user (the test's)
CDC_PASSWORD = "cdc-s3cret"  # noqa: S105 - the listener's ACL user on the data nodes
SENTINEL_PASSWORD = "sentinel-requirepass-s3cret"  # noqa: S105 - the sentinels' requirepass
MONITOR_PASSWORD = "monitor-s3cret"  # noqa: S105 - the sentinels' ACL user on the data nodes
REPL_PASSWORD = "repl-s3cret"  # noqa: S105 - the replica's ACL user on its master
# The `named` runs: sentinels whose default user is off, each client an ACL user of
# sentinel.conf. The listener's needs SENTINEL MASTERS alone (docs/redis.md).
PEER_PASSWORD = "peer-s3cret"  # noqa: S105 - the sentinels' user with one another
WATCH_PASSWORD = "watch-s3cret"  # noqa: S105 - the listener's user on the sentinels
SECRETS = (
    ADMIN_PASSWORD,
    CDC_PASSWORD,
    SENTINEL_PASSWORD,
    MONITOR_PASSWORD,
    REPL_PASSWORD,
    PEER_PASSWORD,
    WATCH_PASSWORD,
)

DATA_NODE_ARGS = [
    "--repl-diskless-sync-delay", "0",
    "--user", "default", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all",
    # docs/redis.md's minimal ACL, word for word.
    "--user", "cdc", "on", f">{CDC_PASSWORD}", "~*", "resetchannels", "-@all",
    "+unlink", "+scan", "+info", "+ping", "+client|setname",
    # What Redis' Sentinel documentation gives a sentinel's user.
    "--user", "sentinel", "on", f">{MONITOR_PASSWORD}", "allchannels", "+multi", "+slaveof",
    "+ping", "+exec", "+subscribe", "+config|rewrite", "+role", "+publish", "+info",
    "+client|setname", "+client|kill", "+script|kill",
    "--user", "repl", "on", f">{REPL_PASSWORD}", "+psync", "+replconf", "+ping",
    "--masteruser", "repl", "--masterauth", REPL_PASSWORD,
]  # fmt: skip


class LockedRedis(RedisServer):
    """A redis-server or sentinel whose default user asks `password`: the test's clients
    (and the start's PING) give it."""

    password = ""
    username: str | None = None

    def client(self, **kwargs: Any) -> redis.Redis:
        return super().client(**{"password": self.password, "username": self.username, **kwargs})


def data_node(tls: RedisTls | None, *args: str) -> LockedRedis:
    extra = ["--tls-replication", "yes"] if tls else []
    node = LockedRedis.create([*DATA_NODE_ARGS, *extra, *args], tls=tls)
    node.password = ADMIN_PASSWORD
    return node


def sentinel(tls: RedisTls | None, master_port: int, *, named: bool = False) -> LockedRedis:
    conf = (
        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 5000\n"
        f"sentinel auth-user {MASTER} sentinel\n"
        f"sentinel auth-pass {MASTER} {MONITOR_PASSWORD}\n"
    )
    if named:
        conf += (
            "user default off\n"
            f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n"  # (the test's)
            f"user peer on >{PEER_PASSWORD} allchannels +@all\n"
            f"user cdc-watch on >{WATCH_PASSWORD} resetchannels -@all +sentinel|masters\n"
            "sentinel sentinel-user peer\n"
            f"sentinel sentinel-pass {PEER_PASSWORD}\n"
        )
    else:
        conf += f"requirepass {SENTINEL_PASSWORD}\n"
    if tls:
        conf += "tls-replication yes\n"  # (a sentinel's connections to the others)
    directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-sentinel-"))
    node = LockedRedis(directory, free_port(), find_redis_server(), [], tls=tls, sentinel_conf=conf)
    node.password, node.username = (ADMIN_PASSWORD, "admin") if named else (SENTINEL_PASSWORD, None)
    return node


@dataclass
class Locked:
    first: LockedRedis  # the master at the start
    second: LockedRedis  # its replica, the master after the failover
    sentinels: list[LockedRedis]
    certs: Certs | None
    named: bool = False  # the sentinels take ACL users by name, their default user off

    def master_port(self, at: LockedRedis) -> int:
        """The master `at` names, as SENTINEL MASTERS shows it (what redis-py asks)."""
        with at.client(decode_responses=True) as client:
            masters: Any = client.sentinel_masters()
        state = masters[MASTER]
        assert state["ip"] == "127.0.0.1"
        return int(state["port"])

    def names_master(self, at: LockedRedis, server: LockedRedis) -> bool:
        return self.master_port(at) == server.port

    def config(self, env: Env, name: str = "sentinel.toml", **settings: object) -> Path:
        tls: dict[str, object] = {}
        if self.certs:
            tls = {
                "redis_tls_ca_file": str(self.certs.ca),
                "redis_tls_cert_file": str(self.certs.client),
            }
        path = write_config(
            env.tmp_path / name,
            database_url=env.dsn,
            redis_url=f"{'rediss' if self.certs else 'redis'}://cdc:{CDC_PASSWORD}@ignored/0",
            # The second sentinel first: the failover is asked of the first, and the
            # listener must hear of it from the other.
            redis_sentinels=[f"127.0.0.1:{s.port}" for s in reversed(self.sentinels)],
            redis_sentinel_master=MASTER,
            tables={"public.users": ["user:{id}", "user:email:{email}"]},
            **{
                **(
                    {
                        "redis_sentinel_username": "cdc-watch",
                        "redis_sentinel_password": WATCH_PASSWORD,
                    }
                    if self.named
                    else {"redis_sentinel_password": SENTINEL_PASSWORD}
                ),
                "replay_history": "15m",
                **tls,
                **settings,
            },
        )
        assert main(["install", "--config", str(path)]) == 0
        return path


def _info(server: RedisServer, section: str) -> dict[str, Any]:
    with server.client(decode_responses=True) as client:
        info: dict[str, Any] = client.info(section)
    return info


def _replica_in_sync(server: RedisServer) -> bool:
    info = _info(server, "replication")
    return info["role"] == "slave" and info.get("master_link_status") == "up"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(params=["plain", "tls"])
def locked(request: pytest.FixtureRequest, certs: Certs) -> Iterator[Locked]:
    """The servers; `named` (asked for by a test): plain, the sentinels' users by name."""
    named = request.param == "named"
    tls_certs = certs if request.param == "tls" else None
    tls = tls_certs.redis_tls() if tls_certs else None
    try:
        first = data_node(tls)
    except ServerError as exc:
        unavailable(f"no redis-server: {exc}")
    with first:
        second = data_node(tls, "--replicaof", "127.0.0.1", str(first.port))
        with second:
            wait_until(lambda: _replica_in_sync(second), what="the replica in sync")
            sentinels = [sentinel(tls, first.port, named=named) for _ in range(2)]
            with sentinels[0], sentinels[1]:
                setup = Locked(first, second, sentinels, tls_certs, named)

                def ready(at: LockedRedis) -> bool:
                    with at.client(decode_responses=True) as client:
                        state: Any = client.sentinel_master(MASTER)
                        replicas: Any = client.sentinel_slaves(MASTER)
                    return state["num-other-sentinels"] == 1 and any(
                        int(r["port"]) == second.port
                        and r.get("master-link-status") == "ok"
                        and not r["is_sdown"]
                        for r in replicas
                    )

                for at in sentinels:
                    wait_until(
                        partial(ready, at), what="the sentinels knowing each other, the replica"
                    )
                yield setup


@pytest.mark.parametrize("locked", ["plain", "tls", "named"], indirect=True)
def test_through_sentinels_with_passwords_to_an_acl_user_across_a_failover(
    env: Env, locked: Locked, spawn: Spawn
) -> None:
    setup = locked
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text); INSERT INTO users VALUES (1, 'a')"
    )
    config = setup.config(env)
    first = setup.first.client(decode_responses=True)
    second = setup.second.client(decode_responses=True)
    first.mset({"user:1": "A", "user:email:a": "1"})
    listener = spawn(config)
    env.sql("UPDATE users SET email = 'b' WHERE id = 1")
    wait_until(lambda: first.exists("user:1", "user:email:a") == 0, what="deleted on the master")
    assert any(c["user"] == "cdc" for c in first.client_list()), "as the ACL user"

    with setup.sentinels[0].client() as asked:
        assert asked.sentinel_failover(MASTER)
    for at in setup.sentinels:  # the other one too: it heard of it from the first
        wait_until(
            partial(setup.names_master, at, setup.second),
            what=f"sentinel {at.port} naming the new master",
        )
    wait_until(lambda: _info(setup.second, "replication")["role"] == "master", what="promoted")

    # A change after the failover: its keys are deleted on the NEW master.
    second.mset({"user:1": "stale", "user:email:b": "1", "user:email:c": "-"})
    env.sql("UPDATE users SET email = 'c' WHERE id = 1")
    wait_until(
        lambda: second.exists("user:1", "user:email:b", "user:email:c") == 0,
        what="deleted on the new master",
    )
    assert any(c["user"] == "cdc" for c in second.client_list())
    wait_until(lambda: listener.logged("redis_changed"), what="the failover noticed")
    # A TRUNCATE's sweep (SCAN, then UNLINK) runs on the new master as the ACL user.
    second.mset({f"user:{i}": "-" for i in range(50)} | {"other:1": "keep"})
    env.sql("TRUNCATE users")
    wait_until(lambda: not second.keys("user:*"), what="TRUNCATE's sweep on the new master")
    assert second.get("other:1") == "keep"
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"named by sentinels 127.0.0.1:{setup.sentinels[1].port}" in out.stdout
    printed = out.stdout + out.stderr + listener.log_path.read_text()
    for secret in SECRETS:
        assert secret not in printed, secret
    first.close()
    second.close()


def test_a_dead_master_is_replaced_by_the_sentinels_vote(
    env: Env, locked: Locked, spawn: Spawn
) -> None:
    """The master killed: the two sentinels (quorum 2) must agree it is down and elect
    one of them to fail over, over connections to each other that need their
    requirepass (and TLS): the listener's next change is deleted on the promoted
    replica."""
    setup = locked
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text); INSERT INTO users VALUES (1, 'a')"
    )
    listener = spawn(setup.config(env))
    with setup.first.client(decode_responses=True) as first:
        first.set("user:1", "A")
        env.sql("UPDATE users SET email = 'b' WHERE id = 1")
        wait_until(lambda: first.exists("user:1") == 0, what="deleted on the master")
    setup.first.kill()
    for at in setup.sentinels:
        wait_until(
            partial(setup.names_master, at, setup.second),
            timeout_s=45,  # (a split vote is tried again 10 s later)
            what=f"sentinel {at.port} naming the promoted replica",
        )
    wait_until(lambda: _info(setup.second, "replication")["role"] == "master", what="promoted")
    # Down by both sentinels' word, not one's: the sentinel that counted the quorum says
    # so (the other may learn of the failover before it counts, and never log +odown:
    # +sdown, then +config-update-from the first, as in one CI run).
    odown = f"+odown master {MASTER} 127.0.0.1 {setup.first.port} #quorum 2/2"
    logs = [(at.directory / "redis.log").read_text() for at in setup.sentinels]
    assert any(odown in log for log in logs), logs
    with setup.second.client(decode_responses=True) as second:
        second.mset({"user:1": "stale", "user:email:b": "1", "user:email:c": "-"})
        env.sql("UPDATE users SET email = 'c' WHERE id = 1")
        wait_until(
            lambda: second.exists("user:1", "user:email:b", "user:email:c") == 0,
            what="deleted on the promoted replica",
        )
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


@pytest.mark.parametrize("locked", ["plain", "named"], indirect=True)
@pytest.mark.parametrize("password", ["wrong-sentinel-pw-42", ""], ids=["wrong", "none"])
def test_a_refused_sentinel_password_names_each_sentinel(
    env: Env, locked: Locked, spawn: Spawn, password: str
) -> None:
    """A wrong sentinel password (or none, to sentinels that ask one): `check` and the
    listener say which sentinel refused what, and which setting that is, and print no
    password. (Without a password redis-py's handshake, HELLO 3, was answered "HELLO
    must be called with the client already authenticated, otherwise the HELLO AUTH
    <user> <pass> option can be used ...", and a wrong one "invalid username-password
    pair", the words a refused redis_url user gets: neither named the setting.)"""
    setup = locked
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    config = setup.config(env, redis_sentinel_password=password)
    if setup.named:
        said = "(the sentinel refused redis_sentinel_username and redis_sentinel_password)"
    elif password:
        said = "(the sentinel refused redis_sentinel_password)"
    else:
        said = "(the sentinel asks for a password: set redis_sentinel_password)"
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    for s in setup.sentinels:
        assert f"sentinel 127.0.0.1:{s.port} - auth:AuthenticationError: " in out.stderr
    assert out.stderr.count(said) == len(setup.sentinels), out.stderr
    listener = spawn(config)
    env.sql("INSERT INTO users VALUES (1, 'a')")
    wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
    (line,) = listener.logged("redis_unavailable")
    for s in setup.sentinels:
        assert f"sentinel 127.0.0.1:{s.port} - auth:AuthenticationError: " in line["error"]
    assert line["error"].count(said) == len(setup.sentinels), line
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
    printed = out.stdout + out.stderr + listener.log_path.read_text()
    for secret in (*SECRETS, password or SENTINEL_PASSWORD):
        assert secret not in printed, secret


@pytest.mark.parametrize("locked", ["plain"], indirect=True)
def test_a_dead_sentinel_is_passed_over_for_a_live_one(
    env: Env, locked: Locked, spawn: Spawn
) -> None:
    """The sentinel the configuration lists first is down (its process killed, its port
    refusing): `check` and a listener started then find the master through the next."""
    setup = locked
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text); INSERT INTO users VALUES (1, 'a')"
    )
    config = setup.config(env)
    setup.sentinels[1].kill()  # (listed first: config() lists them in reverse)
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    listener = spawn(config)
    with setup.first.client(decode_responses=True) as first:
        first.set("user:1", "A")
        env.sql("UPDATE users SET email = 'b' WHERE id = 1")
        wait_until(lambda: first.exists("user:1") == 0, what="deleted on the master")
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
