"""Redis over TLS and as an ACL user: real redis-server processes serving TLS only.

The certificates come from trustme (a throwaway CA made in the test process). The ACL
user is the minimal one of docs/redis.md: UNLINK, SCAN, INFO, PING, CLIENT SETNAME on all keys.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from cdc_invalidator.cli import main
from cdc_invalidator.settings import ConfigError, load_settings
from cdc_invalidator.sink import RedisSink
from cdc_invalidator.sink.connect import RedisOptions, other_db, redis_client
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.evidence import unavailable
from tests.support.listener import ListenerProcess, ListenerThread, run_cli
from tests.support.servers import RedisServer, RedisTls, ServerError
from tests.support.tls import Certs, make_certs
from tests.support.waits import wait_until

PASSWORD = "tls-acl-s3cret"
# docs/redis.md's minimal ACL, word for word (after `ACL SETUSER cdc`).
MINIMAL_ACL = [
    *("on", f">{PASSWORD}", "~*", "resetchannels", "-@all"),
    *("+unlink", "+scan", "+info", "+ping", "+client|setname"),
]
USERS = ["public.users"]
TEMPLATES = ["user:{id}", "user:email:{email}"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls_redis(certs: Certs, auth_clients: Literal["yes", "no"]) -> Iterator[RedisServer]:
    tls = RedisTls(certs.ca, certs.server_cert, certs.server_key, auth_clients)
    try:
        server = RedisServer.create(tls=tls, args=["--user", "cdc", *MINIMAL_ACL])
    except ServerError as exc:
        unavailable(f"no redis-server: {exc}")
    with server:
        yield server


@pytest.fixture(scope="module")
def tls_redis(certs: Certs) -> Iterator[RedisServer]:
    """TLS only; clients need not show a certificate."""
    yield from _tls_redis(certs, "no")


@pytest.fixture(scope="module")
def mtls_redis(certs: Certs) -> Iterator[RedisServer]:
    """TLS only; clients must show a certificate signed by our CA."""
    yield from _tls_redis(certs, "yes")


@pytest.fixture
def users(env: Env) -> Env:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x')"
    )
    return env


def tls_config(env: Env, url: str, name: str = "tls.toml", **settings: object) -> Path:
    path = write_config(
        env.tmp_path / name,
        database_url=env.dsn,
        redis_url=url,
        tables=dict.fromkeys(USERS, TEMPLATES),
        **settings,
    )
    assert main(["install", "--config", str(path)]) == 0
    return path


def admin(server: RedisServer) -> redis.Redis:
    """The default user (no password), over TLS with our client certificate."""
    return server.client(decode_responses=True)


def exercise_all_changes(env: Env, r: redis.Redis) -> None:
    """INSERT, UPDATE, DELETE each delete their keys; TRUNCATE sweeps both templates."""
    r.mset({"user:4": "-", "user:email:d@x": "-", "user:1": "A", "user:email:a@x": "1"})
    r.mset({"user:email:z@x": "-", "user:2": "B", "user:email:b@x": "2"})
    env.sql("INSERT INTO users VALUES (4, 'd@x')")
    wait_until(lambda: r.exists("user:4", "user:email:d@x") == 0, what="INSERT's keys gone")
    env.sql("UPDATE users SET email = 'z@x' WHERE id = 1")
    wait_until(
        lambda: r.exists("user:1", "user:email:a@x", "user:email:z@x") == 0,
        what="UPDATE's old and new keys gone",
    )
    env.sql("DELETE FROM users WHERE id = 2")
    wait_until(lambda: r.exists("user:2", "user:email:b@x") == 0, what="DELETE's keys gone")
    r.mset({f"user:{i}": "x" for i in range(100)} | {"user:email:q@x": "q", "other:1": "keep"})
    env.sql("TRUNCATE users")
    wait_until(lambda: not r.keys("user:*"), what="TRUNCATE's sweep")
    assert r.get("other:1") == "keep"


@pytest.mark.servers
def test_tls_with_ca_verification(users: Env, tls_redis: RedisServer, certs: Certs) -> None:
    url = tls_redis.url
    config = tls_config(users, url, redis_tls_ca_file=str(certs.ca))
    r = admin(tls_redis)
    listener = ListenerThread.from_file(config).start()
    try:
        exercise_all_changes(users, r)
        # Really over TLS: the server has no plain-text port at all.
        assert r.config_get("port")["port"] == "0"
        names = [c["name"] for c in r.client_list()]
        assert "cdc-invalidator" in names
    finally:
        listener.stop()


@pytest.mark.servers
def test_tls_with_a_client_certificate(users: Env, mtls_redis: RedisServer, certs: Certs) -> None:
    url = mtls_redis.url
    config = tls_config(
        users,
        url,
        redis_tls_ca_file=str(certs.ca),
        redis_tls_cert_file=str(certs.client),
    )
    r = admin(mtls_redis)
    r.set("user:3", "C")
    listener = ListenerThread.from_file(config).start()
    try:
        users.sql("UPDATE users SET email = 'cc@x' WHERE id = 3")
        wait_until(lambda: r.exists("user:3") == 0, what="key deleted over mutual TLS")
    finally:
        listener.stop()
    # Without the certificate the server refuses the handshake: `check` says so.
    bare = tls_config(users, url, name="bare.toml", redis_tls_ca_file=str(certs.ca))
    out = run_cli("check", "--config", str(bare))
    assert out.returncode == 1
    # TLS 1.3 reports the refusal after the handshake: the alert, or a closed socket.
    assert re.search(r"certificate required|EOF occurred in violation of protocol", out.stderr)
    assert "Traceback" not in out.stderr


@pytest.mark.servers
def test_a_certificate_from_another_ca_is_refused(
    users: Env, tls_redis: RedisServer, certs: Certs
) -> None:
    url = tls_redis.url
    config = tls_config(users, url, redis_tls_ca_file=str(certs.other_ca))
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 1
    assert "certificate verify failed" in out.stderr
    # redis_tls_verify = "none" encrypts without checking (said to be open to a MITM).
    config = tls_config(users, url, name="none.toml", redis_tls_verify="none")
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 0, out.stderr


@pytest.mark.servers
@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("redis_tls_ca_file", "/nonexistent/ca.pem", "redis_tls_ca_file: no such file"),
        ("redis_tls_cert_file", "/nonexistent/c.pem", "redis_tls_cert_file: no such file"),
    ],
)
def test_a_missing_tls_file_is_a_config_error(
    env: Env, setting: str, value: str, expected: str
) -> None:
    config = write_config(
        env.tmp_path / "bad.toml",
        database_url=env.dsn,
        redis_url="rediss://127.0.0.1:1/0",
        tables=dict.fromkeys(USERS, TEMPLATES),
        **{setting: value},
    )
    for command in ("run", "check"):
        out = run_cli(command, "--config", str(config))
        assert out.returncode == 2
        assert expected in out.stderr
        assert value in out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.servers
def test_minimal_acl_user_over_tls(users: Env, tls_redis: RedisServer, certs: Certs) -> None:
    url = f"rediss://cdc:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    config = tls_config(users, url, redis_tls_ca_file=str(certs.ca))
    # The user really is limited: it may not read, write or flush.
    limited = redis.Redis.from_url(url, ssl_ca_certs=str(certs.ca))
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.get("user:1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.flushall()
    limited.close()
    r = admin(tls_redis)
    r.flushall()
    listener = ListenerThread.from_file(config).start()
    try:
        exercise_all_changes(users, r)
        assert any(c["user"] == "cdc" for c in r.client_list())
    finally:
        listener.stop()
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr


@pytest.mark.servers
def test_check_says_a_user_without_scan_cannot_sweep(
    users: Env, tls_redis: RedisServer, certs: Certs
) -> None:
    """The review's user without +scan: check said all was well, and the first TRUNCATE's
    sweep held every later change until the ACL was fixed."""
    r = admin(tls_redis)
    acl = [c for c in MINIMAL_ACL[5:] if c != "+scan"]
    r.acl_setuser(
        "noscan", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
        commands=["-@all", *acl], reset=True,
    )  # fmt: skip
    try:
        url = f"rediss://noscan:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
        config = tls_config(users, url, redis_tls_ca_file=str(certs.ca))
        out = run_cli("check", "--config", str(config))
        assert out.returncode == 1, out.stdout + out.stderr
        assert "no permissions to run the 'scan' command" in out.stderr, out.stderr
        assert PASSWORD not in out.stdout + out.stderr
    finally:
        r.acl_deluser("noscan")


@pytest.mark.servers
def test_check_names_select_for_a_table_in_another_database(
    users: Env, tls_redis: RedisServer, certs: Certs
) -> None:
    """The minimal ACL has no +select, which a table's redis_db needs: check told the user
    to give "those keys" in its ACL (a review following the docs), when what is missing
    is the command."""
    # (the server's user cdc has docs/redis.md's minimal ACL)
    url = f"rediss://cdc:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    config = users.tmp_path / "db2.toml"
    config.write_text(
        f'database_url = "{users.dsn}"\nredis_url = "{url}"\n'
        f'redis_tls_ca_file = "{certs.ca}"\n'
        '[tables."public.users"]\nkeys = ["user:{id}"]\nredis_db = 2\n'
    )
    assert main(["install", "--config", str(config)]) == 0
    out = run_cli("check", "--config", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Give the user +select in its ACL (a database other than 0)" in out.stderr, out.stderr
    assert PASSWORD not in out.stdout + out.stderr


@pytest.mark.servers
def test_without_client_setname_the_name_must_be_off(tls_redis: RedisServer, certs: Certs) -> None:
    r = admin(tls_redis)
    r.acl_setuser(
        "noname",
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["*"],
        commands=["-@all", "+unlink", "+scan", "+info"],
        reset=True,
    )
    url = f"rediss://noname:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    named = RedisSink(redis_client(RedisOptions(url, tls_ca_file=str(certs.ca))))
    with pytest.raises(redis.exceptions.NoPermissionError, match=r"client\|setname"):
        named.unlink(["k"])
    named.close()
    r.set("k", "v")
    nameless = RedisSink(
        redis_client(RedisOptions(url, tls_ca_file=str(certs.ca), client_name=None))
    )
    assert nameless.unlink(["k"]) == 1
    assert nameless.sweep(["k*"]) == 0
    nameless.close()
    r.acl_deluser("noname")


@pytest.mark.servers
def test_wrong_password_is_reported_and_retried_until_fixed(
    users: Env, tls_redis: RedisServer, certs: Certs, tmp_path: Path
) -> None:
    wrong = "not-the-right-one-42"
    url = f"rediss://late:{wrong}@127.0.0.1:{tls_redis.port}/0"
    config = tls_config(users, url, redis_tls_ca_file=str(certs.ca))
    r = admin(tls_redis)
    r.acl_setuser(
        "late",
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["*"],
        commands=["-@all", "+unlink", "+scan", "+info", "+client|setname"],
        reset=True,
    )
    r.set("user:3", "C")
    listener = ListenerProcess(config, tmp_path / "listener.log").start()
    try:
        users.sql("UPDATE users SET email = 'c2@x' WHERE id = 3")
        wait_until(lambda: listener.logged("redis_unavailable"), what="redis_unavailable")
        (line,) = listener.logged("redis_unavailable")
        assert line["level"] == "warning"
        assert "AuthenticationError" in line["error"]
        assert "invalid username-password pair" in line["error"]
        assert r.get("user:3") == "C"  # nothing deleted, nothing acknowledged
        # The secret is rotated on the server's side: the retries get through.
        r.acl_setuser("late", enabled=True, passwords=[f"+{wrong}"])
        wait_until(lambda: r.exists("user:3") == 0, what="key deleted once the password works")
        wait_until(lambda: listener.logged("redis_available"), what="redis_available")
        assert len(listener.logged("redis_unavailable")) == 1  # one line, not one per retry
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        listener.kill()
        r.acl_deluser("late")
    log = (tmp_path / "listener.log").read_text()
    assert wrong not in log
    assert "rediss://late:***@" in log


# Settings (no servers): what the Redis connection settings accept and refuse.

GOOD = """
database_url = "postgresql://app@db/app"
redis_url = "rediss://cdc:pw@cache:6379/0"
[tables.users]
keys = ["user:{id}"]
"""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('redis_sentinels = ["s1:26379"]\n', "redis_sentinels and redis_sentinel_master go"),
        ('redis_sentinel_master = "m"\n', "redis_sentinels and redis_sentinel_master go"),
        (
            'redis_sentinels = ["s1"]\nredis_sentinel_master = "m"\n',
            "redis_sentinels.0: 's1' is not host:port",
        ),
        (
            'redis_sentinels = ["s1:0"]\nredis_sentinel_master = "m"\n',
            "redis_sentinels.0: 's1:0' is not host:port",
        ),
        ('redis_tls_verify = "maybe"\n', "redis_tls_verify"),
        ('redis_client_name = "two words"\n', "redis_client_name"),
    ],
)
def test_bad_redis_settings(tmp_path: Path, extra: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(extra + GOOD)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_settings(path)


def test_tls_files_need_rediss_and_a_cert_for_the_key(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    path = tmp_path / "c.toml"
    path.write_text(f"redis_tls_ca_file = {str(pem)!r}\n" + GOOD.replace("rediss:", "redis:"))
    with pytest.raises(ConfigError, match="redis_tls_ca_file is set but redis_url"):
        load_settings(path)
    path.write_text(f"redis_tls_key_file = {str(pem)!r}\n" + GOOD)
    with pytest.raises(ConfigError, match="redis_tls_key_file is set without"):
        load_settings(path)
    path.write_text(GOOD.replace("rediss:", "http:"))
    with pytest.raises(ConfigError, match="redis_url: must start with redis://"):
        load_settings(path)


def test_sentinels_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("CDC_INVALIDATOR_REDIS_SENTINEL_MASTER", "mymaster")
    monkeypatch.setenv("CDC_INVALIDATOR_REDIS_SENTINELS", "s1:26379, [::1]:26380")
    settings = load_settings(path)
    options = RedisOptions.from_settings(settings)
    assert options.sentinels == (("s1", 26379), ("::1", 26380))
    assert options.tls
    monkeypatch.setenv("CDC_INVALIDATOR_REDIS_SENTINELS", '["s2:1"]')
    assert load_settings(path).redis_sentinels == ["s2:1"]
    monkeypatch.setenv("CDC_INVALIDATOR_REDIS_SENTINELS", "[s2:1")
    with pytest.raises(ConfigError, match="neither a JSON list"):
        load_settings(path)


def test_other_db_keeps_tls_the_user_and_sentinel() -> None:
    """Per-table redis_db: the client for another db connects as the main one does."""
    options = RedisOptions(
        "rediss://cdc:pw@ignored/0",
        tls_ca_file="/ca.pem",
        sentinels=(("127.0.0.1", 1),),
        sentinel_master="mymaster",
    )
    main_client = redis_client(options)  # connects lazily: nothing is reached here
    other = other_db(main_client, 3)
    pool = other.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_class is main_client.connection_pool.connection_class
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "cdc", "pw")
    assert kwargs["ssl_ca_certs"] == "/ca.pem"
    assert (
        kwargs["connection_pool"]
        is not main_client.connection_pool.connection_kwargs["connection_pool"]
    )
    plain = other_db(redis_client(RedisOptions("rediss://u:p@h:1/0", tls_ca_file="/ca.pem")), 2)
    assert plain.connection_pool.connection_kwargs["db"] == 2
    assert plain.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
