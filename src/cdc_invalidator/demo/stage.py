"""The demo's stage: what it starts (a PostgreSQL and a Redis, the config, our SQL, the
listener in a thread, the keyspace watch, the app and psql) and what it stops and removes
again, whatever state the run ended in."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import redis
import structlog

from cdc_invalidator.demo.actors import App, Psql
from cdc_invalidator.demo.common import STEP_TIMEOUT_S, DemoError, say
from cdc_invalidator.demo.servers import PostgresServer, RedisServer
from cdc_invalidator.demo.watch import DeleteWatch
from cdc_invalidator.install import install
from cdc_invalidator.listener import build_listener
from cdc_invalidator.modes.choose import mode_for
from cdc_invalidator.runner import Runner
from cdc_invalidator.settings import Settings, load_settings
from cdc_invalidator.shutdown import Stopper, stop_signals_handled
from cdc_invalidator.sink import AutoSink

DBNAME = "app"
TEMPLATES = ["user:{id}", "user:email:{email}"]
USERS = [
    (1, "ada@example.com", "Ada"),
    (2, "grace@example.com", "Grace"),
    (3, "edsger@example.com", "Edsger"),
]
# A throwaway cluster needs no durability; fsync would only add disk latency to COMMIT.
DEMO_PG_SETTINGS = {"fsync": "off", "full_page_writes": "off"}

CONFIG_TEMPLATE = """\
# Written by `cdc-invalidator demo`: the same file you would write for your own app.
database_url = "{database_url}"
redis_url = "{redis_url}"
capture = "{capture}"
log_level = "warning"
# 300 ms by default: every key deleted again that long after its change, for a reader
# that SETs an old row after our delete. Off here: the demo times each delete by its
# keyspace notification, and caches a key again at once for the next scene, which a
# second delete would take before that scene's change.
second_delete_ms = 0

# Which Redis keys cache a row of each table. Fields are column names.
[tables."public.users"]
keys = {keys}
"""


@dataclass(frozen=True)
class Cast:
    """What the story plays with, once the stage is set."""

    settings: Settings
    runner: Runner
    cache: redis.Redis
    app: App
    psql: Psql


class Stage:
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
        self.delete_watch: DeleteWatch | None = None
        self.cache: redis.Redis | None = None
        self.app: App | None = None
        self.psql: Psql | None = None

    def setup(self) -> Cast:
        started = time.monotonic()
        say("Starting PostgreSQL and Redis on free loopback ports ...")
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
        self.cache = cache = redis.Redis.from_url(self.redis.url, decode_responses=True)
        info: dict[str, Any] = cache.info("server")
        who = f", run as the {self.pg.user} user" if self.pg.user else ""
        say(f"  PostgreSQL {pg_version} on 127.0.0.1:{self.pg.port}{who}")
        say(f"  Redis {info.get('redis_version', '?')} on 127.0.0.1:{self.redis.port}")
        say(f"  ready in {time.monotonic() - started:.1f} s")
        dsn = self.pg.dsn(DBNAME)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text)"
            )

        config = self.config_path()
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
            install(conn, mode_for(settings))
        runner = self._start_listener(settings)
        self.delete_watch = DeleteWatch(self.redis.port)

        # The sample rows go in through the watched table. The last one's INSERT deletes a
        # cached "no such user": once that is gone, the listener is connected and has
        # taken every row (changes are processed in commit order). Seen gone through the
        # keyspace watch, the clock of every delete the story waits for (story.py).
        last = f"user:{USERS[-1][0]}"
        cache.set(last, "-")
        sent = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.cursor().executemany("INSERT INTO users VALUES (%s, %s, %s)", USERS)
        self.deletes().wait([last], sent)
        say(f"Created table users with {len(USERS)} rows: " + ", ".join(n for *_, n in USERS))
        self.app = App(dsn, cache)
        self.psql = Psql(dsn, DBNAME, say)
        return Cast(settings, runner, cache, self.app, self.psql)

    def _start_listener(self, settings: Settings) -> Runner:
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
        return runner

    # -- while the story runs -------------------------------------------------------

    def config_path(self) -> Path:
        if self.workdir is None:
            raise DemoError("the demo's directory is not set up yet")
        return self.workdir / "cdc-invalidator.toml"

    def deletes(self) -> DeleteWatch:
        """The keyspace watch, the listener checked to be running still."""
        self.check_listener()
        if self.delete_watch is None:
            raise DemoError("the keyspace watch is not started yet")
        return self.delete_watch

    def check_listener(self) -> None:
        if self.listener_error is not None:
            raise DemoError(f"the listener failed: {self.listener_error}")
        if self.listener is None or not self.listener.is_alive():
            raise DemoError("the listener is not running")

    def until(self, predicate: Callable[[], bool], what: str = "the listener") -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        delay = 0.001
        while not predicate():
            self.check_listener()
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- cleanup --------------------------------------------------------------------

    def stop_listener(self) -> None:
        if self.stopper is not None:
            self.stopper.stop()
        if self.listener is not None:
            self.listener.join(STEP_TIMEOUT_S)

    def cleanup(self, keep: bool) -> None:
        """Stop and remove everything started, whatever state the run ended in."""
        # (A second Ctrl-C must not leave servers running.)
        with stop_signals_handled(signal.SIG_IGN):
            _attempt("listener", self.stop_listener)
            for name, closeable in [
                ("keyspace watch", self.delete_watch),
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
        say()
        if keep:
            self._say_kept()
        else:
            say("Cleaned up: servers stopped, temporary directories removed.")

    def _say_kept(self) -> None:
        if self.workdir is None:
            return
        dirs = [self.workdir]
        say("Servers stopped; everything is kept (--keep):")
        say(f"  {self.config_path()}   the config")
        if self.pg is not None:
            dirs.append(self.pg.directory)
            say(f"  {self.pg.directory}/   PostgreSQL: data/, postgres.log")
        if self.redis is not None:
            dirs.append(self.redis.directory)
            say(f"  {self.redis.directory}/   Redis: redis.log")
        if self.pg is not None:
            as_user = f"runuser -u {self.pg.user} -- " if self.pg.user else ""
            say("Start PostgreSQL again (database app, port in data/postgresql.auto.conf):")
            pg_ctl = self.pg.bindir / "pg_ctl"
            say(f"  {as_user}{pg_ctl} -D {self.pg.datadir} -l {self.pg.logfile} start")
        say(f"Remove it all with: rm -rf {' '.join(str(d) for d in dirs)}")


def _attempt(what: str, step: Callable[[], object]) -> None:
    """One cleanup step; its failure is logged and must not skip the others."""
    try:
        step()
    except Exception as exc:
        structlog.get_logger("cdc_invalidator.demo").warning(
            "demo_cleanup_failed", step=what, error=f"{type(exc).__name__}: {exc}"
        )
