"""No password reaches stdout, stderr or the logs, on any path (real CLI processes).

Every password here is distinctive and starts with MARK, so that a leak of any part of
one that includes its start shows. They sit in every form a URL can hold them (a
PostgreSQL URL, percent-encoded, a libpq keyword string with a quoted value, Redis with
a password, an ACL user, TLS, the sentinels' own password), given in the TOML file or
in CDC_INVALIDATOR_* variables, and the CLI runs against a bad configuration, closed
ports, servers that refuse the password, and servers that accept it.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from cdc_invalidator.cli import main
from cdc_invalidator.redact import Scrubber, redact_url, secrets_of
from tests.support.config import FAST, toml_value
from tests.support.env import FAST_PG
from tests.support.evidence import unavailable
from tests.support.listener import ListenerProcess, run_cli
from tests.support.servers import PostgresServer, RedisServer, RedisTls, ServerError, free_port
from tests.support.waits import wait_until

MARK = "S3cr3t"
PG_PLAIN = f"{MARK}-pg-9f1c"
PG_ENCODED = f"{MARK}/pg@7b2e"  # percent-encoded in a URL: %2F and %40
PG_QUOTED = f"{MARK} kw 41d0"  # spaces: quoted in a keyword string
REDIS_PASSWORD = f"{MARK}-rd-0b7e"  # requirepass (the default user)
ACL_PASSWORD = f"{MARK}-acl-5d21"
TLS_PASSWORD = f"{MARK}-tls-c9a3"
SENTINEL_PASSWORD = f"{MARK}-sn-3e88"
NUMERIC_PASSWORD = 918273645  # a TOML integer where a password belongs
SECRETS = [
    MARK,
    PG_PLAIN,
    PG_ENCODED,
    quote(PG_ENCODED, safe=""),
    "pg%407b2e",
    PG_QUOTED,
    "kw 41d0",
    REDIS_PASSWORD,
    ACL_PASSWORD,
    TLS_PASSWORD,
    SENTINEL_PASSWORD,
    str(NUMERIC_PASSWORD),
]
MASTER = "mymaster"
TABLES = {"public.users": ["user:{id}"]}
# Every command that connects and ends (they share the connection code: the first
# case of a test runs them all, the others `check`).
ONE_SHOT = [
    ["check"],
    ["status", "--json"],
    ["install"],
    ["uninstall"],
    ["replay", "--since", "1m"],
]


def assert_clean(result: subprocess.CompletedProcess[str], code: int, expected: str) -> None:
    """The command ended as expected, said why, and showed no secret and no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == code, text
    assert expected in text, text
    assert "Traceback" not in text, text
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{leaked} in:\n{text}"


def as_env(settings: Mapping[str, object]) -> dict[str, str]:
    """Settings as CDC_INVALIDATOR_* variables (a list as "a,b")."""
    return {
        f"CDC_INVALIDATOR_{name.upper()}": (
            ",".join(map(str, value)) if isinstance(value, list) else str(value)
        )
        for name, value in settings.items()
    }


@dataclass
class Config:
    """A configuration given in the file, or in variables beside a file of tables."""

    path: Path
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--config", str(self.path), env=self.env)


def configure(
    path: Path,
    settings: Mapping[str, object],
    *,
    via: str = "file",
    file_only: Mapping[str, object] | None = None,
) -> Config:
    """`settings` in the TOML file (via="file") or the environment (via="env");
    `file_only` always in the file; FAST settings and TABLES in the file."""
    # History kept: `replay` then has invalidations to send to Redis.
    in_file = {
        **FAST,
        "replay_history": "1h",
        **(file_only or {}),
        **(settings if via == "file" else {}),
    }
    lines = [f"{key} = {toml_value(value)}" for key, value in in_file.items()]
    for table, keys in TABLES.items():
        lines += [f"[tables.{toml_value(table)}]", f"keys = {toml_value(keys)}"]
    path.write_text("\n".join(lines) + "\n")
    return Config(path, as_env(settings) if via == "env" else {})


# --- Finding the passwords (pure) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "written", "meant"),
    [
        (f"postgresql://u:{PG_PLAIN}@h/db", PG_PLAIN, PG_PLAIN),
        (f"postgresql://u:{quote(PG_ENCODED, safe='')}@h/db", "S3cr3t%2Fpg%407b2e", PG_ENCODED),
        (f"postgresql://u@h/db?password={PG_PLAIN}", PG_PLAIN, PG_PLAIN),
        (f"host=h password='{PG_QUOTED}' dbname=db", f"'{PG_QUOTED}'", PG_QUOTED),
        ("host=h password='it\\'s-S3cr3t'", "'it\\'s-S3cr3t'", "it's-S3cr3t"),
        # libpq cannot read these; an error message may quote any part of them.
        (f"postgresql://u:{MARK}%zz@h/db", f"{MARK}%zz", f"{MARK}%zz"),
        (f"host=h password={MARK}-a {MARK}-b dbname=db", f"{MARK}-b", f"{MARK}-a {MARK}-b"),
        (f"redis://:{REDIS_PASSWORD}@h:6379/0", REDIS_PASSWORD, REDIS_PASSWORD),
        (f"rediss://cdc:{quote(PG_ENCODED, safe='')}@h/0", "S3cr3t%2Fpg%407b2e", PG_ENCODED),
        # No colon: redis-py reads a user name, but it was meant as a password.
        (f"redis://{REDIS_PASSWORD}@h:6379/0", REDIS_PASSWORD, REDIS_PASSWORD),
        # An "@" not percent-encoded: libpq and redis-py split at the first one, and
        # echo the rest as a host name.
        (f"postgresql://u:pw@{MARK}@h:5432/db", f"pw@{MARK}", f"pw@{MARK}"),
        (f"redis://u:pw@{MARK}@h:6379/0", f"pw@{MARK}", f"pw@{MARK}"),
        (f"redis://u:p?w#{MARK}@h:6379/0", f"p?w#{MARK}", f"p?w#{MARK}"),
        # A space not percent-encoded: libpq refuses the URL and names the words.
        (f"postgresql://u:my {MARK} pw@h/db", f"my {MARK} pw", f"my {MARK} pw"),
        (f"redis://:my {MARK} pw@127.0.0.1:6379/0", f"my {MARK} pw", f"my {MARK} pw"),
    ],
)
def test_secrets_of_finds_passwords_as_written_and_as_meant(
    url: str, written: str, meant: str
) -> None:
    found = secrets_of(url)
    assert {written, meant} <= set(found)
    scrub = Scrubber(found)
    assert MARK not in scrub(f"{url} / {written} / {meant}")


def test_a_redis_url_whose_password_has_no_colon_is_redacted_whole() -> None:
    """redis://SECRET@host: redis-py reads a user name, older clients a password."""
    assert redact_url(f"redis://{REDIS_PASSWORD}@h:6379/0") == "redis://***@h:6379/0"
    assert redact_url("postgresql://app@db/app") == "postgresql://app@db/app"


# --- The servers: PostgreSQL with scram-sha-256, Redis with passwords -------------------


@dataclass
class Locked:
    pg_port: int
    redis: RedisServer
    tls_redis: RedisServer | None
    ca_file: Path | None
    sentinel: RedisServer

    def write(self) -> None:
        """A change of a watched row: an invalidation for `replay` to send again."""
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.pg_port}/app") as conn:
            conn.execute("INSERT INTO users SELECT coalesce(max(id), 0) + 1 FROM users")

    def dsn(self, form: str, password: str | None = None) -> str:
        """A DSN of the role of this form, with its password (or another one)."""
        host = f"127.0.0.1:{self.pg_port}"
        if form == "url":
            return f"postgresql://app_url:{password or PG_PLAIN}@{host}/app"
        if form == "encoded":
            return f"postgresql://app_encoded:{quote(password or PG_ENCODED, safe='')}@{host}/app"
        return (
            f"host=127.0.0.1 port={self.pg_port} dbname=app user=app_keyword "
            f"password='{password or PG_QUOTED}'"
        )

    def redis_settings(
        self, form: str, password: str | None = None, port: int | None = None
    ) -> dict[str, object]:
        """redis_url (and TLS or Sentinel settings) of this form, with its password (or
        another), at the server's port (or another: the sentinel's, for Sentinel)."""
        if form == "password":
            url = f"redis://:{password or REDIS_PASSWORD}@127.0.0.1:{port or self.redis.port}/0"
            return {"redis_url": url}
        if form == "acl":
            url = f"redis://cdc:{password or ACL_PASSWORD}@127.0.0.1:{port or self.redis.port}/0"
            return {"redis_url": url}
        if form == "tls":
            if self.tls_redis is None:
                unavailable("trustme is not installed: no TLS server")
            return {
                "redis_url": f"rediss://cdc:{password or TLS_PASSWORD}@127.0.0.1:"
                f"{port or self.tls_redis.port}/0",
                "redis_tls_ca_file": str(self.ca_file),
            }
        # Sentinel: the sentinels' own password; the master's is in the URL.
        return {
            "redis_url": f"redis://:{REDIS_PASSWORD}@ignored-with-sentinels/0",
            "redis_sentinels": [f"127.0.0.1:{port or self.sentinel.port}"],
            "redis_sentinel_master": MASTER,
            "redis_sentinel_password": password or SENTINEL_PASSWORD,
        }


PG_FORMS = ["url", "encoded", "keyword"]
REDIS_FORMS = ["password", "acl", "tls", "sentinel"]


def _locked_postgres() -> Iterator[int]:
    """A cluster that asks every role but postgres for its password (scram-sha-256)."""
    try:
        pg = PostgresServer.create(FAST_PG)
    except ServerError as exc:
        unavailable(f"no local PostgreSQL: {exc}")
    with pg:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            for role, password in [
                ("app_url", PG_PLAIN),
                ("app_encoded", PG_ENCODED),
                ("app_keyword", PG_QUOTED),
            ]:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password)
                    )
                )
            conn.execute("CREATE DATABASE app")
        with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
            conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
        (pg.datadir / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
        )
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        # The reload is asynchronous: wait until the postmaster asks for passwords.
        wait_until(lambda: _refused(pg.port), what="pg_hba.conf reloaded")
        yield pg.port


def _refused(port: int) -> bool:
    try:
        psycopg.connect(f"postgresql://app_url:wrong@127.0.0.1:{port}/app").close()
    except psycopg.OperationalError as exc:
        return "password authentication failed" in str(exc)
    return False


def _protect(server: RedisServer, acl: str) -> None:
    """Started open (its start-up PING has no password), then locked: the ACL user
    `cdc` and a password for the default user."""
    client = server.client()
    client.acl_setuser("cdc", enabled=True, passwords=[f"+{acl}"], keys=["*"], commands=["+@all"])
    client.acl_setuser(
        "default", enabled=True, reset_passwords=True, passwords=[f"+{REDIS_PASSWORD}"]
    )
    client.close()


def _tls_redis(tmp: Path) -> Iterator[tuple[RedisServer | None, Path | None]]:
    try:
        import trustme
    except ImportError:
        yield None, None
        return
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    server = RedisServer.create(tls=RedisTls(ca_file, cert_file, key_file, "no"))
    with server:
        _protect(server, TLS_PASSWORD)
        yield server, ca_file


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    try:
        redis_server = RedisServer.create()
    except ServerError as exc:
        unavailable(f"no redis-server: {exc}")
    with redis_server:
        _protect(redis_server, ACL_PASSWORD)
        sentinel = RedisServer.create_sentinel(redis_server.port, MASTER)
        sentinel.sentinel_conf = (sentinel.sentinel_conf or "") + (
            f"sentinel auth-pass {MASTER} {REDIS_PASSWORD}\n"
        )
        with sentinel:
            client = sentinel.client()
            client.acl_setuser(
                "default", enabled=True, reset_passwords=True, passwords=[f"+{SENTINEL_PASSWORD}"]
            )
            client.close()
            for tls_redis, ca_file in _tls_redis(tmp_path_factory.mktemp("certs")):
                for pg_port in _locked_postgres():
                    yield Locked(pg_port, redis_server, tls_redis, ca_file, sentinel)


# --- A bad configuration beside the secrets ----------------------------------------------

# Every secret setting, with a closed sentinel port: these tests never connect.
SECRET_SETTINGS: dict[str, object] = {
    "database_url": f"postgresql://app:{PG_PLAIN}@127.0.0.1:1/app",
    "redis_url": f"redis://cdc:{ACL_PASSWORD}@127.0.0.1:1/0",
    "redis_sentinels": ["127.0.0.1:1"],
    "redis_sentinel_master": MASTER,
    "redis_sentinel_password": SENTINEL_PASSWORD,
}


@dataclass(frozen=True)
class Bad:
    name: str
    settings: dict[str, object]  # over SECRET_SETTINGS; given as the case's `via` says
    expected: str  # the culprit, named
    file_only: tuple[tuple[str, object], ...] = ()  # always in the file
    vias: tuple[str, ...] = ("file", "env")


BAD = [
    Bad("invalid port", {}, "metrics_port: Input should be less", (("metrics_port", 99999),)),
    Bad(
        "unknown setting holding a password",
        {},
        "unknown setting 'redis_password'",
        (("redis_password", REDIS_PASSWORD),),
    ),
    Bad("bad integer from a variable", {"batch_size": "many"}, "batch_size"),
    Bad("database_url of a wrong type", {"database_url": 5}, "database_url", vias=("file",)),
    Bad(
        "database_url as a list",
        {"database_url": [f"postgresql://app:{PG_PLAIN}@h/app"]},
        "database_url: Input should be a valid string",
        vias=("file",),
    ),
    Bad(
        "sentinel password of a wrong type",
        {"redis_sentinel_password": NUMERIC_PASSWORD},
        "redis_sentinel_password: Input should be a valid string",
        vias=("file",),
    ),
    Bad(
        "redis_url with a wrong scheme",
        {"redis_url": f"http://cdc:{ACL_PASSWORD}@127.0.0.1:1/0"},
        "redis_url: must start with redis://",
    ),
    Bad(
        "redis_url with a bad port",
        {"redis_url": f"rediss://cdc:{TLS_PASSWORD}@127.0.0.1:port/0"},
        "redis_url: not a Redis URL",
    ),
    Bad(
        "redis_url that asks for decoded replies",
        {"redis_url": f"redis://cdc:{ACL_PASSWORD}@127.0.0.1:1/0?decode_responses=True"},
        "redis_url: sets decode_responses",
    ),
    Bad(
        "database_url with a bad percent-encoding",
        {"database_url": f"postgresql://app:{MARK}%zz-9f1c@127.0.0.1:1/app"},
        "database_url: libpq cannot read it (invalid percent-encoded token",
    ),
    Bad(
        "database_url with a space in its password",
        {"database_url": f"postgresql://app:my {MARK} pw@127.0.0.1:1/app"},
        "database_url: libpq cannot read it (unexpected spaces",
    ),
    Bad(
        "keyword password with an unquoted space",
        {"database_url": f"host=127.0.0.1 password={MARK}-one {MARK}-two dbname=app"},
        "database_url: libpq cannot read it (missing",
    ),
    Bad(
        "sentinels without a master",
        {"redis_sentinel_master": ""},
        "redis_sentinels and redis_sentinel_master go together",
    ),
    Bad("a bad sentinel address", {"redis_sentinels": ["nowhere"]}, "is not host:port"),
    Bad(
        "a sentinel address with user info",
        {"redis_sentinels": [f"u:{MARK}-sentinel@h:26379"]},
        "redis_sentinel_password",
    ),
    Bad(
        "tables from a variable that is not JSON",
        {"tables": "{not json"},
        "CDC_INVALIDATOR_TABLES",
        vias=("env",),
    ),
]


@pytest.mark.parametrize(
    ("bad", "via"),
    [(bad, via) for bad in BAD for via in bad.vias],
    ids=[f"{bad.name}-{via}" for bad in BAD for via in bad.vias],
)
def test_a_bad_configuration_shows_no_password(tmp_path: Path, bad: Bad, via: str) -> None:
    config = configure(
        tmp_path / "config.toml",
        {**SECRET_SETTINGS, **bad.settings},
        via=via,
        file_only=dict(bad.file_only),
    )
    # The configuration is read the same way for every command (before it runs): the
    # listener or one that prints for a person here; the first case runs them all.
    commands = [["run"] if via == "env" else ["check"]]
    if bad is BAD[0]:
        commands = [["run"], ["check"], ["sql"], ["status", "--json"], ["install"]]
        commands += [["uninstall"], ["replay", "--since", "1m"]]
    for command in commands:
        assert_clean(config.cli(*command), 2, bad.expected)


# --- Servers that cannot be reached --------------------------------------------------------


def closed_port() -> int:
    return free_port()  # bound and released: nothing listens on it


@pytest.mark.parametrize(
    ("database_url", "via"),
    [
        (f"postgresql://app:{PG_PLAIN}@127.0.0.1:{{port}}/app", "file"),
        (f"postgresql://app:{quote(PG_ENCODED, safe='')}@127.0.0.1:{{port}}/app", "file"),
        (f"host=127.0.0.1 port={{port}} dbname=app password='{PG_QUOTED}'", "file"),
        (f"host=127.0.0.1 port={{port}} dbname=app password='{PG_QUOTED}'", "env"),
        (f"postgresql://app@127.0.0.1:{{port}}/app?password={PG_PLAIN}", "env"),
    ],
    ids=["url", "encoded", "keyword", "keyword-env", "query-env"],
)
def test_an_unreachable_database_shows_no_password(
    tmp_path: Path, database_url: str, via: str
) -> None:
    settings = {
        "database_url": database_url.format(port=closed_port()),
        "redis_url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{closed_port()}/0",
    }
    config = configure(tmp_path / "config.toml", settings, via=via)
    for command in ONE_SHOT if "app:" in database_url else ONE_SHOT[:1]:
        assert_clean(config.cli(*command), 1, "cannot connect to PostgreSQL at ")


# Each Redis form once, given in the file or in variables.
REDIS_VIAS = [("password", "file"), ("acl", "env"), ("tls", "file"), ("sentinel", "env")]


@pytest.fixture
def installed(locked: Locked, tmp_path: Path) -> Locked:
    """Our schema in the database (as the DBA installs it), so that `replay` reaches Redis."""
    config = configure(tmp_path / "install.toml", {"database_url": locked.dsn("url")})
    assert main(["install", "--config", str(config.path)]) == 0
    locked.write()
    return locked


@pytest.mark.parametrize(("form", "via"), REDIS_VIAS)
def test_an_unreachable_redis_shows_no_password(
    tmp_path: Path, installed: Locked, form: str, via: str
) -> None:
    locked = installed
    settings = {
        "database_url": locked.dsn("keyword"),
        **locked.redis_settings(form, port=closed_port()),
    }
    config = configure(tmp_path / "config.toml", settings, via=via)
    assert_clean(config.cli("check"), 1, "error: redis at ")
    assert_clean(config.cli("replay", "--since", "1m"), 1, "cdc-invalidator: error: Redis")


# --- Servers that refuse the password ------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "via"), [("url", "file"), ("encoded", "env"), ("keyword", "file")]
)
def test_a_refused_database_password_is_not_shown(
    tmp_path: Path, locked: Locked, form: str, via: str
) -> None:
    wrong = {"url": f"{MARK}-wrong-a1", "encoded": f"{MARK}/wrong@b2", "keyword": f"{MARK} c3"}
    settings = {"database_url": locked.dsn(form, wrong[form]), **locked.redis_settings("acl")}
    config = configure(tmp_path / "config.toml", settings, via=via)
    for command in ONE_SHOT if form == "url" else ONE_SHOT[:1]:
        assert_clean(config.cli(*command), 1, "password authentication failed")


# A wrong password (it starts with MARK too), and what redis-py says of it.
WRONG_REDIS = f"{MARK}-wrong-d4"
REFUSED = {
    "password": "invalid username-password pair",
    "acl": "invalid username-password pair",
    "tls": "invalid username-password pair",
    "sentinel": f"No master found for {MASTER!r}",
}


@pytest.mark.parametrize(("form", "via"), REDIS_VIAS)
def test_a_refused_redis_password_is_not_shown(
    tmp_path: Path, installed: Locked, form: str, via: str
) -> None:
    settings = {"database_url": installed.dsn("url"), **installed.redis_settings(form, WRONG_REDIS)}
    config = configure(tmp_path / "config.toml", settings, via=via)
    assert_clean(config.cli("check"), 1, REFUSED[form])
    assert_clean(config.cli("replay", "--since", "1m"), 1, REFUSED[form])


# --- Servers that accept it ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pg_form", "redis_form", "via"),
    [
        ("url", "password", "file"),
        ("encoded", "acl", "env"),
        ("keyword", "tls", "file"),
        ("keyword", "sentinel", "env"),
    ],
)
def test_working_commands_show_no_password(
    tmp_path: Path, locked: Locked, pg_form: str, redis_form: str, via: str
) -> None:
    settings = {"database_url": locked.dsn(pg_form), **locked.redis_settings(redis_form)}
    config = configure(tmp_path / "config.toml", settings, via=via)
    if redis_form == "password":  # needs no server
        assert_clean(config.cli("sql"), 0, "CREATE SCHEMA")
    assert_clean(config.cli("install"), 0, "installed cdc_invalidator")
    locked.write()
    if redis_form == "password":
        assert_clean(config.cli("status"), 0, "backlog:")
    assert_clean(config.cli("check"), 0, "ok: redis at ")
    status = config.cli("status", "--json")
    assert_clean(status, 0, '"capture": "trigger"')
    assert json.loads(status.stdout)["backlog"] > 0
    assert_clean(config.cli("replay", "--since", "1m"), 0, "keys were back and are deleted again")
    assert_clean(config.cli("uninstall"), 0, "uninstalled")


# --- The listener's logs -------------------------------------------------------------------


def _listen(config: Config, log: Path, event: str) -> str:
    """`run` until it logs `event` (a store down or refusing), then SIGTERM; the log."""
    listener = ListenerProcess(config.path, log, config.env).start()
    try:
        wait_until(lambda: listener.logged(event), what=event)
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        listener.kill()
    return log.read_text()


def _assert_log_clean(text: str, event: str, expected: str) -> None:
    records = [json.loads(line) for line in text.splitlines()]  # every line JSON
    logged = [r for r in records if r["event"] == event]
    assert logged, text
    assert expected in logged[0]["error"], logged[0]
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{leaked} in:\n{text}"


@pytest.mark.parametrize("via", ["file", "env"])
def test_listener_logs_no_password_while_postgres_is_down(
    tmp_path: Path, locked: Locked, via: str
) -> None:
    settings = {
        "database_url": f"host=127.0.0.1 port={closed_port()} dbname=app password='{PG_QUOTED}'",
        **locked.redis_settings("sentinel"),
    }
    config = configure(tmp_path / "config.toml", settings, via=via)
    text = _listen(config, tmp_path / "listener.log", "postgres_unavailable")
    _assert_log_clean(text, "postgres_unavailable", "Connection refused")
    loaded = json.loads(text.splitlines()[0])
    assert loaded["event"] == "config_loaded"
    assert "password=***" in loaded["database_url"]


@pytest.mark.parametrize(
    ("pg_form", "redis_form"), [("url", "password"), ("encoded", "acl"), ("keyword", "sentinel")]
)
def test_listener_logs_no_password_while_redis_refuses(
    tmp_path: Path, installed: Locked, pg_form: str, redis_form: str
) -> None:
    settings = {
        "database_url": installed.dsn(pg_form),
        **installed.redis_settings(redis_form, WRONG_REDIS),
    }
    config = configure(tmp_path / "config.toml", settings, via="env")
    text = _listen(config, tmp_path / "listener.log", "redis_unavailable")
    _assert_log_clean(text, "redis_unavailable", REFUSED[redis_form])


def test_listener_logs_no_password_while_postgres_refuses(tmp_path: Path, locked: Locked) -> None:
    wrong = f"{MARK}/wrong@k1"
    settings = {"database_url": locked.dsn("encoded", wrong), **locked.redis_settings("acl")}
    config = configure(tmp_path / "config.toml", settings)
    text = _listen(config, tmp_path / "listener.log", "postgres_unavailable")
    _assert_log_clean(text, "postgres_unavailable", "password authentication failed")
