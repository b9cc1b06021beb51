"""`cdc-invalidator demo`: the whole story on throwaway servers, in a few seconds.

Starts a PostgreSQL and a Redis of its own, installs our SQL on a sample `users` table,
runs the real listener in a thread, then plays an app doing cache-aside reads and an
admin changing rows in psql, and prints what happened with the measured time from COMMIT
to the key being gone (seen through a Redis keyspace notification). Everything it
started is stopped and removed at the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, LiteralString, TypeVar

import psycopg
import redis
import structlog
from redis.client import PubSub

from cdc_invalidator import logs
from cdc_invalidator.install import install
from cdc_invalidator.listener import build_listener
from cdc_invalidator.runner import Runner
from cdc_invalidator.servers import (
    PostgresServer,
    RedisServer,
    ServerError,
    find_pg_bindir,
    find_redis_server,
)
from cdc_invalidator.settings import ConfigError, Settings, load_settings
from cdc_invalidator.shutdown import Stopper
from cdc_invalidator.sink import AutoSink

_T = TypeVar("_T")

DBNAME = "app"
TEMPLATES = ["user:{id}", "user:email:{email}"]
USERS = [
    (1, "ada@example.com", "Ada"),
    (2, "grace@example.com", "Grace"),
    (3, "edsger@example.com", "Edsger"),
]
# Single-row updates timed for the closing figures.
TIMED_UPDATES = 100
# How long any one step may take before the demo gives up on it.
STEP_TIMEOUT_S = 15.0
# A throwaway cluster needs no durability; fsync would only add disk latency to COMMIT.
DEMO_PG_SETTINGS = {"fsync": "off", "full_page_writes": "off"}

CONFIG_TEMPLATE = """\
# Written by `cdc-invalidator demo`: the same file you would write for your own app.
database_url = "{database_url}"
redis_url = "{redis_url}"
capture = "{capture}"
log_level = "warning"

# Which Redis keys cache a row of each table. Fields are column names.
[tables."public.users"]
keys = {keys}
"""


class DemoError(Exception):
    """A step of the demo did not turn out as it should; the message says which."""


def run_demo(keep: bool = False, capture: str = "trigger") -> int:
    """Run the demo; 0 when everything worked, 1 otherwise (a one-line error, no traceback)."""
    # The listener's own log lines would drown the story: only its warnings, on stderr.
    logs.configure(level="warning", to="stderr")
    try:
        # Before anything is printed or created: what is missing, in one line.
        find_pg_bindir()
        find_redis_server()
    except ServerError as exc:
        _error(str(exc))
        return 1
    demo = Demo(capture)
    code = 1
    with _sigterm_interrupts():
        try:
            demo.run()
            code = 0
        except KeyboardInterrupt:
            _say("\ninterrupted: cleaning up")
        except (ServerError, ConfigError) as exc:
            _error(str(exc))
        except (DemoError, psycopg.Error, redis.RedisError) as exc:
            where = {psycopg.Error: "PostgreSQL: ", redis.RedisError: "Redis: "}
            prefix = next((p for t, p in where.items() if isinstance(exc, t)), "")
            hint = "" if keep else " (run `cdc-invalidator demo --keep` to keep the servers' logs)"
            _error(f"{prefix}{str(exc).strip()}{hint}")
        finally:
            demo.cleanup(keep)
    return code


def _say(text: str = "") -> None:
    print(text, flush=True)


def _error(message: str) -> None:
    print(f"cdc-invalidator: error: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C does (signal handlers only from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """While cleaning up, a second Ctrl-C must not leave servers running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class DeleteWatch:
    """Records when keys are deleted, from Redis keyspace notifications, in a thread.

    Redis publishes `del` on `__keyspace@0__:<key>` as it runs the listener's UNLINK;
    the thread stamps each with time.perf_counter() as it arrives.
    """

    def __init__(self, port: int, db: int = 0) -> None:
        self._prefix = f"__keyspace@{db}__:"
        self._client = redis.Redis(
            host="127.0.0.1", port=port, db=db, decode_responses=True, socket_timeout=5
        )
        self._pubsub: PubSub = self._client.pubsub()
        self._deleted: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._pubsub.psubscribe(self._prefix + "*")
        # Only once Redis confirmed the subscription can no deletion slip past us.
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            message = self._pubsub.get_message(timeout=1.0)
            if message and message["type"] == "psubscribe":
                break
            if time.monotonic() > deadline:
                raise DemoError("Redis did not confirm the keyspace subscription")
        self._thread = threading.Thread(target=self._listen, name="delete-watch", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            while not self._stop.is_set():
                message = self._pubsub.get_message(timeout=0.1)
                stamp = time.perf_counter()
                if not message or message["type"] != "pmessage" or message["data"] != "del":
                    continue
                key = str(message["channel"]).removeprefix(self._prefix)
                with self._cond:
                    self._deleted.append((stamp, key))
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced by wait(); the thread just ends
            with self._cond:
                self._failure = exc
                self._cond.notify_all()

    def wait(self, keys: Iterable[str], since: float) -> dict[str, float]:
        """When each key was deleted after `since` (perf_counter), waiting for all of them."""
        wanted = set(keys)
        deadline = time.monotonic() + STEP_TIMEOUT_S
        with self._cond:
            while True:
                seen = {key: t for t, key in reversed(self._deleted) if t >= since}
                found = {key: seen[key] for key in wanted if key in seen}
                if len(found) == len(wanted):
                    return found
                if self._failure is not None:
                    raise DemoError(f"lost the keyspace notifications: {self._failure}")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = ", ".join(sorted(wanted - found.keys()))
                    raise DemoError(f"{missing} not deleted within {STEP_TIMEOUT_S:.0f} s")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()
        self._client.close()


@dataclass(frozen=True, slots=True)
class Read:
    key: str
    hit: bool
    value: dict[str, Any] | None


class App:
    """The application: cache-aside reads by id, keys exactly as in the config."""

    def __init__(self, dsn: str, cache: redis.Redis) -> None:
        self._db = psycopg.connect(dsn, autocommit=True, application_name="demo-app")
        self._cache = cache

    def read_user(self, user_id: int) -> Read:
        key = f"user:{user_id}"
        cached = self._cache.get(key)
        if cached is not None:
            return Read(key, True, json.loads(str(cached)))
        row = self._db.execute(
            "SELECT id, email, name FROM users WHERE id = %s", (user_id,)
        ).fetchone()
        if row is None:
            return Read(key, False, None)
        value = {"id": row[0], "email": row[1], "name": row[2]}
        pipe = self._cache.pipeline(transaction=False)
        pipe.set(key, json.dumps(value))
        pipe.set(f"user:email:{row[1]}", str(row[0]))
        pipe.execute()
        return Read(key, False, value)

    def user_id_by_email(self, email: str) -> str:
        """Lookup by email, caching "no such user" as an empty string (a negative cache)."""
        key = f"user:email:{email}"
        cached = self._cache.get(key)
        if cached is not None:
            return str(cached)
        row = self._db.execute("SELECT id FROM users WHERE email = %s", (email,)).fetchone()
        found = "" if row is None else str(row[0])
        self._cache.set(key, found)
        return found

    def close(self) -> None:
        self._db.close()


class Psql:
    """An admin at a psql prompt: prints each statement and its command tag."""

    def __init__(self, dsn: str, say: Callable[[str], None]) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True, application_name="psql")
        self._say = say

    @property
    def connection(self) -> psycopg.Connection[Any]:
        return self._conn

    def prompt(self) -> str:
        in_tx = self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        return f"{DBNAME}=*#" if in_tx else f"{DBNAME}=#"

    def run(self, statement: LiteralString) -> float:
        """Run one statement as psql would; returns perf_counter() from just before it."""
        self._say(f"    {self.prompt()} {statement};")
        started = time.perf_counter()
        cur = self._conn.execute(statement)
        self._say(f"    {cur.statusmessage}")
        return started

    def close(self) -> None:
        self._conn.close()


class Demo:
    def __init__(self, capture: str = "trigger") -> None:
        self.capture = capture
        self.pg: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.workdir: Path | None = None
        self.stopper: Stopper | None = None
        self.sink: AutoSink | None = None
        self.runner: Runner | None = None
        self.listener: threading.Thread | None = None
        self.listener_error: BaseException | None = None
        self.watch: DeleteWatch | None = None
        self.cache: redis.Redis | None = None
        self.app: App | None = None
        self.psql: Psql | None = None

    # -- the story ------------------------------------------------------------------

    def run(self) -> None:
        _say(
            "cdc-invalidator demo: a throwaway PostgreSQL and Redis, a users table, the "
            "listener,\nan app that caches rows in Redis and an admin who edits them in psql."
        )
        _say()
        settings = self._setup()
        _say(f"Config ({self._config_path()}):")
        _say('    [tables."public.users"]')
        _say(f"    keys = {json.dumps(TEMPLATES)}")
        if self.capture == "logical":
            _say(
                "Installed our SQL (schema cdc_invalidator, a publication for public.users, "
                "REPLICA IDENTITY FULL\nfor the old email, a replication slot): no triggers."
            )
        else:
            _say("Installed our SQL (schema cdc_invalidator, triggers on public.users).")
        _say("The listener is running (in a thread here; `cdc-invalidator run` in production).")
        self._scene_cache_aside()
        self._scene_admin_update()
        self._scene_email_change()
        self._scene_rollback()
        self._scene_truncate()
        self._scene_timed_updates(settings)
        self._stop_listener()
        runner = self._get(self.runner)
        _say()
        _say(
            f"The listener processed {runner.events_processed} events and deleted "
            f"{runner.keys_deleted} keys that existed; {runner.dead_letters} dead letters."
        )

    def _scene_cache_aside(self) -> None:
        self._section("1. The app reads user 1, cache-aside")
        app = self._get(self.app)
        self._show_read(app.read_user(1))
        self._show_read(app.read_user(1))

    def _scene_admin_update(self) -> None:
        self._section("2. An admin fixes the name in psql, behind the app's back")
        psql, cache, app = self._get(self.psql), self._get(self.cache), self._get(self.app)
        psql.run("BEGIN")
        psql.run("UPDATE users SET name = 'Ada Lovelace' WHERE id = 1")
        if cache.exists("user:1") != 1:
            raise DemoError("user:1 was deleted before COMMIT")
        _say("    -- user:1 is still cached: nothing is invalidated before COMMIT")
        committed = psql.run("COMMIT")
        gone = self._watch().wait(["user:1"], committed)
        _say(f"  => user:1 deleted {_ms(gone['user:1'] - committed)} after COMMIT was sent.")
        read = app.read_user(1)
        self._show_read(read)
        if read.hit or read.value is None or read.value["name"] != "Ada Lovelace":
            raise DemoError(f"the app did not read the new name: {read}")
        _say("  The app serves the new name: no stale cache, and the app changed nothing.")

    def _scene_email_change(self) -> None:
        self._section("3. The email changes: the old email's key must go too")
        psql, app = self._get(self.psql), self._get(self.app)
        found = app.user_id_by_email("ada@lovelace.dev")
        _say(f'  The app looked up ada@lovelace.dev: no such user, cached as "{found}".')
        keys = ["user:1", "user:email:ada@example.com", "user:email:ada@lovelace.dev"]
        self._show_cached(keys)
        sent = psql.run("UPDATE users SET email = 'ada@lovelace.dev' WHERE id = 1")
        times = self._watch().wait(keys, sent)
        _say(
            "  => all three deleted (the old row's keys and the new row's), the last "
            f"{_ms(max(times.values()) - sent)}\n     after the statement was sent."
        )
        if app.user_id_by_email("ada@lovelace.dev") != "1":
            raise DemoError("the lookup by the new email did not find user 1")
        _say("  The app's lookup of ada@lovelace.dev now finds user 1.")

    def _scene_rollback(self) -> None:
        self._section("4. A change that rolls back invalidates nothing")
        psql, cache, app = self._get(self.psql), self._get(self.cache), self._get(self.app)
        app.read_user(2)
        app.read_user(3)
        psql.run("BEGIN")
        psql.run("UPDATE users SET name = 'Oops' WHERE id = 2")
        psql.run("ROLLBACK")
        sent = psql.run("UPDATE users SET name = 'Edsger W. Dijkstra' WHERE id = 3")
        self._watch().wait(["user:3"], sent)
        if cache.exists("user:2") != 1:
            raise DemoError("user:2 was deleted by a rolled-back UPDATE")
        _say("  => user:3 deleted; user:2 is still cached, as it should be.")

    def _scene_truncate(self) -> None:
        self._section("5. TRUNCATE: no rows to name, so each template is swept as a glob")
        psql, cache, app = self._get(self.psql), self._get(self.cache), self._get(self.app)
        for user_id, _email, _name in USERS:
            app.read_user(user_id)
        cache.set("session:42", "not ours")
        ours = sorted(str(k) for k in cache.scan_iter(match="user:*"))
        _say(f"  Cached: {len(ours)} user keys, and session:42 (not a users key).")
        sent = psql.run("TRUNCATE users")
        times = self._watch().wait(ours, sent)
        if cache.exists("session:42") != 1:
            raise DemoError("session:42 was swept with the users keys")
        _say(
            f"  => SCAN + UNLINK of user:* and user:email:* deleted all {len(ours)} within "
            f"{_ms(max(times.values()) - sent)};\n     session:42 is untouched."
        )

    def _scene_timed_updates(self, settings: Settings) -> None:
        self._section(f"6. {TIMED_UPDATES} more single-row updates, each timed from its COMMIT")
        conn, cache = self._get(self.psql).connection, self._get(self.cache)
        # A cached "no such user" that the INSERT must delete: once it is gone, the
        # listener has caught up (changes are processed in commit order).
        cache.set("user:1", "-")
        conn.execute("INSERT INTO users VALUES (%s, %s, %s)", USERS[0])
        self._until(lambda: cache.exists("user:1") == 0)
        lags: list[float] = []
        for i in range(TIMED_UPDATES):
            cache.set("user:1", "cached")
            conn.execute("BEGIN")
            conn.execute("UPDATE users SET name = %s WHERE id = 1", (f"Ada #{i}",))
            committed = time.perf_counter()
            conn.execute("COMMIT")
            lags.append(self._watch().wait(["user:1"], committed)["user:1"] - committed)
        lags.sort()
        p99 = lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))]
        _say(
            f"  COMMIT -> key deleted: p50 {_ms(statistics.median(lags))}, p99 {_ms(p99)}, "
            f"max {_ms(lags[-1])}."
        )
        if self.capture == "logical":
            _say("  The WAL sender streams each transaction to the listener as it commits.")
        else:
            _say(
                "  NOTIFY wakes the listener at once (it would otherwise poll every "
                f"{settings.poll_interval_ms} ms)."
            )

    def _setup(self) -> Settings:
        started = time.monotonic()
        _say("Starting PostgreSQL and Redis on free loopback ports ...")
        self.workdir = Path(tempfile.mkdtemp(prefix="cdc-invalidator-demo-"))
        self.pg = PostgresServer.create(DEMO_PG_SETTINGS)
        # Keyspace notifications (K) for generic commands (g: DEL, UNLINK) time deletes.
        self.redis = RedisServer.create(["--notify-keyspace-events", "Kg"])
        self.pg.start()
        self.redis.start()
        with psycopg.connect(self.pg.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
            row = conn.execute("SHOW server_version").fetchone()
        pg_version = str(row[0]).split()[0] if row else "?"
        self.cache = redis.Redis.from_url(self.redis.url, decode_responses=True)
        info: dict[str, Any] = self.cache.info("server")
        who = f", run as the {self.pg.user} user" if self.pg.user else ""
        _say(f"  PostgreSQL {pg_version} on 127.0.0.1:{self.pg.port}{who}")
        _say(f"  Redis {info.get('redis_version', '?')} on 127.0.0.1:{self.redis.port}")
        _say(f"  ready in {time.monotonic() - started:.1f} s")
        dsn = self.pg.dsn(DBNAME)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text)"
            )

        config = self._config_path()
        config.write_text(
            CONFIG_TEMPLATE.format(
                database_url=dsn,
                redis_url=self.redis.url,
                keys=json.dumps(TEMPLATES),
                capture=self.capture,
            ),
            encoding="utf-8",
        )
        settings = load_settings(config)
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            install(conn, settings)
        self._start_listener(settings)
        self.watch = DeleteWatch(self.redis.port)

        # The sample rows go in through the watched table. The last one's INSERT deletes a
        # cached "no such user": once that is gone, the listener is connected and has
        # taken every row (changes are processed in commit order).
        last = f"user:{USERS[-1][0]}"
        self.cache.set(last, "-")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.cursor().executemany("INSERT INTO users VALUES (%s, %s, %s)", USERS)
        cache = self.cache
        self._until(lambda: cache.exists(last) == 0, "the listener to take the first events")
        _say(f"Created table users with {len(USERS)} rows: " + ", ".join(n for *_, n in USERS))
        self.app = App(dsn, self.cache)
        self.psql = Psql(dsn, _say)
        return settings

    def _start_listener(self, settings: Settings) -> None:
        self.stopper = Stopper()
        self.runner, self.sink = build_listener(settings, self.stopper)
        runner = self.runner

        def run() -> None:
            try:
                runner.run()
            except BaseException as exc:
                self.listener_error = exc

        self.listener = threading.Thread(target=run, name="listener", daemon=True)
        self.listener.start()

    # -- helpers --------------------------------------------------------------------

    def _config_path(self) -> Path:
        return self._get(self.workdir) / "cdc-invalidator.toml"

    @staticmethod
    def _get(value: _T | None) -> _T:
        """What setup created: present for as long as the story runs."""
        if value is None:
            raise DemoError("the demo was not set up")
        return value

    def _watch(self) -> DeleteWatch:
        self._check_listener()
        return self._get(self.watch)

    def _check_listener(self) -> None:
        if self.listener_error is not None:
            raise DemoError(f"the listener failed: {self.listener_error}")
        if self.listener is None or not self.listener.is_alive():
            raise DemoError("the listener is not running")

    def _until(self, predicate: Callable[[], bool], what: str = "the listener") -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        delay = 0.001
        while not predicate():
            self._check_listener()
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _section(title: str) -> None:
        _say()
        _say(f"== {title}")

    @staticmethod
    def _show_read(read: Read) -> None:
        if read.hit:
            _say(f"    GET {read.key}  -> hit: {json.dumps(read.value)}")
            return
        _say(f"    GET {read.key}  -> (nil), a miss")
        if read.value is None:
            _say("    SELECT ... FROM users  -> no row")
            return
        query = "SELECT id, email, name FROM users WHERE id = "
        _say(f"    {query}{read.value['id']}  -> {read.value['name']!r}")
        _say(f"    SET {read.key}, SET user:email:{read.value['email']}  (cache refilled)")

    def _show_cached(self, keys: list[str]) -> None:
        values = self._get(self.cache).mget(keys)
        _say("  Cached now:")
        for key, value in zip(keys, values, strict=True):
            _say(f"    {key} = {value!r}")

    # -- cleanup --------------------------------------------------------------------

    def _stop_listener(self) -> None:
        if self.stopper is not None:
            self.stopper.stop()
        if self.listener is not None:
            self.listener.join(STEP_TIMEOUT_S)

    def cleanup(self, keep: bool) -> None:
        """Stop and remove everything started, whatever state the run ended in."""
        with _uninterruptible():
            _attempt("listener", self._stop_listener)
            for name, closeable in [
                ("keyspace watch", self.watch),
                ("app", self.app),
                ("psql", self.psql),
                ("cache client", self.cache),
                ("redis sink", self.sink),
                ("stopper", self.stopper),
            ]:
                if closeable is not None:
                    _attempt(name, closeable.close)
            if keep:
                if self.pg is not None and self.pg.running():
                    _attempt("postgres", self.pg.stop)
                if self.redis is not None:
                    _attempt("redis", self.redis.stop)
            else:
                if self.pg is not None:
                    _attempt("postgres", self.pg.destroy)
                if self.redis is not None:
                    _attempt("redis", self.redis.destroy)
                if self.workdir is not None:
                    _attempt("workdir", partial(shutil.rmtree, self.workdir))
        _say()
        if keep:
            self._say_kept()
        else:
            _say("Cleaned up: servers stopped, temporary directories removed.")

    def _say_kept(self) -> None:
        if self.workdir is None:
            return
        dirs = [self.workdir]
        _say("Servers stopped; everything is kept (--keep):")
        _say(f"  {self._config_path()}   the config")
        if self.pg is not None:
            dirs.append(self.pg.directory)
            _say(f"  {self.pg.directory}/   PostgreSQL: data/, postgres.log")
        if self.redis is not None:
            dirs.append(self.redis.directory)
            _say(f"  {self.redis.directory}/   Redis: redis.log")
        if self.pg is not None:
            as_user = f"runuser -u {self.pg.user} -- " if self.pg.user else ""
            _say("Start PostgreSQL again (database app, port in data/postgresql.auto.conf):")
            pg_ctl = self.pg.bindir / "pg_ctl"
            _say(f"  {as_user}{pg_ctl} -D {self.pg.datadir} -l {self.pg.logfile} start")
        _say(f"Remove it all with: rm -rf {' '.join(str(d) for d in dirs)}")


def _attempt(what: str, step: Callable[[], object]) -> None:
    """One cleanup step; its failure is logged and must not skip the others."""
    try:
        step()
    except Exception as exc:
        structlog.get_logger("cdc_invalidator.demo").warning(
            "demo_cleanup_failed", step=what, error=f"{type(exc).__name__}: {exc}"
        )


def _scalar(conn: psycopg.Connection[Any], query: LiteralString) -> object:
    row = conn.execute(query).fetchone()
    return None if row is None else row[0]
