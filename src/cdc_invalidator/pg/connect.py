"""Every PostgreSQL session the tool opens, made in one place.

Each session gets the configured `database_url`, `application_name` (with a suffix that
says which session it is, in pg_stat_activity) and `connect_timeout`; a `Kind` adds what
that session needs: TCP keepalives both ways (capture/keepalive.py) for the sessions
that hold the lock or the slot, settings SET once connected (a startup `options`
parameter is refused by poolers such as PgBouncer), startup options for the replication
session (no pooler stands between it and the walsender). A pooler that would move a
session between server connections is refused before anything is set.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from psycopg import sql

from cdc_invalidator.capture import keepalive
from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.pg import raw_text, versions
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.settings import Settings

# The settings that change how a value prints, as the trigger functions pin them (their
# SET clause, sql/schema.sql): a key renders the same whichever session wrote the row.
RENDER_SETTINGS = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO,MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
)
# The walsender prints values with its session's settings: pinned the same way, so that
# keys render the same in both modes, with search_path as the capture functions pin it (a
# regclass key prints schema-qualified in both). As startup options, and SET once
# connected: PGTZ and PGDATESTYLE in the listener's environment are startup parameters
# that libpq sends after the options, and would win (a timestamp key in the listener's
# time zone, which no application caches under).
RENDER_OPTIONS = " ".join(f"-c {name}={value}" for name, value in RENDER_SETTINGS)
WALSENDER_SETTINGS = (
    *RENDER_SETTINGS,
    ("quote_all_identifiers", "off"),  # (a role's or database's setting would quote it)
)
# Every session's search_path: our queries name our objects with their schema and call
# PostgreSQL's own functions, often through a cast or a polymorphic argument. Under a
# default search_path ("$user", public) a function another role made in public with the
# exact argument types would be chosen instead, and run as the listener (or as the
# superuser running check): it could delete queue rows or move the slot's saved position
# before they are invalidated. (One schema: SET takes a literal list as one quoted name;
# pg_temp, searched first for tables, is this session's own, and never for functions.)
SEARCH_PATH = ("search_path", "pg_catalog")
# Losing our own bookkeeping writes in a server crash only re-delivers events (their
# keys are deleted twice), so the listener does not wait for WAL fsync and takes no fsync
# bandwidth from the writers.
NO_FSYNC_WAIT = ("synchronous_commit", "off")
# A lasting session's settings (Kind.lasting), as (setting, value, the major version
# that has it). A DBA's timeouts for forgotten sessions, set on the listener's role or
# the database, ended the listener's: idle_session_timeout below ~2 s made it reconnect
# in a loop (its deletes waiting), and transaction_timeout (or
# idle_in_transaction_session_timeout) killed the side session that reads a replay's
# history while the keys are deleted, so the listener exited at every start, and the
# walsender within a large streamed transaction, so the slot never passed it (a
# review, both modes). And default_transaction_read_only, which PostgreSQL says is no
# security measure: the listener's role set so had the listener exit at its first
# write (its books, Redis' identity), in a loop, while `check` saw nothing wrong.
# And default_transaction_isolation = serializable (a database whose writers rely on
# it): each of the listener's reads of the queue took part in the writers' read/write
# dependencies and was cancelled now and then ("Canceled on conflict out to pivot"):
# 5 to 16 reconnects in 8 s of four serializable writers, each logged as
# postgres_unavailable, the keys waiting for the back-off (a review, PostgreSQL 15).
# Its reads need no more than read committed: a window is one statement's snapshot.
LASTING_SETTINGS = (
    ("default_transaction_isolation", "read committed", versions.OLDEST),
    ("idle_in_transaction_session_timeout", 0, versions.OLDEST),
    ("idle_session_timeout", 0, versions.IDLE_SESSION_TIMEOUT),
    ("transaction_timeout", 0, versions.TRANSACTION_TIMEOUT),
    ("default_transaction_read_only", "off", versions.OLDEST),
)
# How long a scrape's reading of the database may take: a hung database fails the
# reading (status_up 0) instead of holding the scrape and the collector's lock.
METRICS_STATEMENT_TIMEOUT = "5s"


# How many times a session that a pooler stands in front of is watched for moving to
# another server connection (_refuse_pooling), and how long its statement may
# wait for a server connection while another session holds one.
POOLER_ROUNDS = 3
POOLER_WAIT_S = 2.0
# How long a session pool that passed stays trusted by a connector: a standby connects
# every poll_interval_ms (each check opens sessions), and a pool switched to transaction
# mode (a RELOAD) is found at the first connect after this (third review).
POOLER_RECHECK_S = 60.0


class PoolerInTheWay(Fatal, psycopg.OperationalError):
    """database_url reaches PostgreSQL through a pooler that moves a session between
    server connections (PgBouncer's transaction or statement pool), or that refuses
    replication connections. Retrying cannot help: the URL must change. (A Fatal for the
    listener and the commands; an OperationalError for what reads metrics.)"""


POOLER_HELP = "point database_url at PostgreSQL itself: docs/operations.md, Connection poolers"


class InRecovery(psycopg.OperationalError):
    """The server is a standby: it takes no writes, the listener's or the app's. After a
    failover the URL may name the old primary's address until DNS or a virtual IP moves
    (or name several hosts): a server down for the listener, which waits and retries."""


@dataclass(frozen=True, slots=True)
class Kind:
    """What one kind of session needs besides the URL, its name and connect_timeout."""

    suffix: str = ""  # added to application_name
    keepalives: bool = False  # a session whose end frees a lock or a slot
    # A session of the running listener (or of `replay`, which reads history as it
    # does): it idles between changes or scrapes, or holds a transaction as long as its
    # work takes (a replay's history read while its keys are deleted, a large
    # transaction decoded). A role's or database's timeouts for forgotten sessions are
    # turned off in it (LASTING_SETTINGS).
    lasting: bool = False
    settings: tuple[tuple[str, str | int], ...] = ()  # SET once connected
    # Startup options; the server's keepalives then go there too (with keepalives only).
    options: str = ""
    replication: bool = False  # replication=database: the walsender's protocol
    # A session that writes: on a standby (in recovery) it is InRecovery, which the
    # listener waits out as it does a server down.
    writes: bool = False
    # A session that reads captured rows, which a SQL_ASCII database may hold in any
    # bytes: it reads them as they are (pg/raw_text.py) instead of failing at them.
    raw_text: bool = False

    def __post_init__(self) -> None:
        if self.options and not self.keepalives:
            raise ValueError("startup options are for a session with keepalives")


# Trigger mode's consumer: holds the advisory lock, LISTENs, reads and saves progress.
# A window is read in (xid, id) order, a chunk at a time: that must be an ordered index
# scan that stops after the chunk. A queue table's statistics are always out of date, and
# with them the planner picks a bitmap scan that sorts the whole window for every chunk
# (measured: 5x slower on a 100k-row window). (Turning sequential scans off as well was
# measured to make latency 50x worse at p99.)
LISTENER = Kind(
    keepalives=True,
    settings=(NO_FSYNC_WAIT, ("enable_bitmapscan", "off")),
    writes=True,
    raw_text=True,
    lasting=True,
)
# Logical mode's ordinary session beside the stream: slot state, dead letters, history.
BOOKKEEPING = Kind(keepalives=True, settings=(NO_FSYNC_WAIT,), writes=True, lasting=True)
# Logical mode's stream (START_REPLICATION).
REPLICATION = Kind(
    keepalives=True,
    options=RENDER_OPTIONS,
    settings=WALSENDER_SETTINGS,
    replication=True,
    lasting=True,
)
# Short-lived sessions beside the listener (replay's identity watch, the history a
# replay or a start reads while its keys are deleted): they hold no lock or slot, and
# are named apart from the listener's own session in pg_stat_activity.
SIDE = Kind(suffix="-side", raw_text=True, lasting=True)
# The metrics collector's session, read at scrape time (idle between scrapes: a role's
# idle_session_timeout had status_up read 0 every other scrape).
METRICS = Kind(
    suffix="-metrics",
    settings=(("statement_timeout", METRICS_STATEMENT_TIMEOUT),),
    lasting=True,
)
# A one-shot command (install, check, status, ...).
CLI = Kind(suffix="-cli")
# The one that reads captured rows: replay.
REPLAY = Kind(suffix="-cli", raw_text=True, lasting=True)  # (as the listener's replay)


class PgConnector:
    """Opens sessions of each kind for one database."""

    def __init__(
        self,
        database_url: str,
        *,
        application_name: str,
        connect_timeout_s: float,
        session_pool: bool = False,
    ):
        self.database_url = database_url
        self._application_name = application_name
        # libpq takes whole seconds; 0 would mean "wait forever".
        self._connect_timeout = max(1, round(connect_timeout_s))
        # Settings.session_pool: a pooler in front is let through if it keeps a session
        # on one server connection; without it, any pooler is refused.
        self._session_pool = session_pool
        # When that pooler was last checked and let through (time.monotonic()): not
        # checked again for POOLER_RECHECK_S.
        self._pool_seen_at: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PgConnector:
        return cls(
            settings.database_url,
            application_name=settings.application_name,
            connect_timeout_s=settings.connect_timeout_s,
            session_pool=settings.session_pool,
        )

    def connect(self, kind: Kind, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        conninfo = self.database_url
        if kind.keepalives:
            conninfo = keepalive.conninfo(conninfo, kind.options)
        extra: dict[str, Any] = {"replication": "database"} if kind.replication else {}
        open_session = partial(
            psycopg.connect,
            conninfo,
            autocommit=autocommit,
            application_name=self._application_name + kind.suffix,
            connect_timeout=self._connect_timeout,
            # Whatever PGCLIENTENCODING, the role's or the database's default say: a
            # value the client encoding cannot hold would fail the listener's reads of
            # it (a row's key, a dead letter), and a SQL_ASCII database would send text
            # psycopg does not decode.
            client_encoding="UTF8",
            **extra,
        )
        try:
            conn = open_session()
        except psycopg.OperationalError as exc:
            # PgBouncer's answer to a replication connection: no retry changes it.
            if kind.replication and "unsupported startup parameter: replication" in str(exc):
                raise PoolerInTheWay(
                    "database_url reaches a connection pooler, which refuses the replication "
                    f"connection logical capture streams from ({exc}): {POOLER_HELP}"
                ) from None
            raise
        settings = _settings(conn, kind)
        try:
            # (a pooler passing a replication connection on would keep it whole)
            seen = self._pool_seen_at
            if not kind.replication and (
                seen is None or time.monotonic() - seen > POOLER_RECHECK_S
            ):
                pooled = _refuse_pooling(
                    conn, partial(open_session, autocommit=True), self._session_pool
                )
                self._pool_seen_at = time.monotonic() if pooled else None
            if kind.writes:
                _refuse_standby(conn)
            if settings:  # (always: search_path)
                # In one round trip: a standby connects again every poll_interval_ms.
                conn.execute(
                    sql.SQL("; ").join(
                        sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                        for name, value in settings
                    )
                )
                if not autocommit:
                    conn.commit()  # a SET in a transaction that is rolled back is undone
        except BaseException:
            conn.close()
            raise
        return conn

    def factory(self, kind: Kind) -> Callable[[], psycopg.Connection[Any]]:
        """A function that opens a session of this kind (for who reconnects at will)."""
        return partial(self.connect, kind)


def _settings(conn: psycopg.Connection[Any], kind: Kind) -> list[tuple[str, str | int]]:
    """What a session of this kind SETs once connected (and, in a SQL_ASCII database,
    how it reads text)."""
    settings: list[tuple[str, str | int]] = [SEARCH_PATH, *kind.settings]
    if kind.lasting:
        major = conn.info.server_version // 10000
        settings += [(name, value) for name, value, since in LASTING_SETTINGS if major >= since]
    if (kind.replication or kind.raw_text) and (
        conn.info.parameter_status("server_encoding") == raw_text.ENCODING
    ):
        # A SQL_ASCII database holds any bytes, and the server checks what it sends a
        # UTF8 session: it fails at the first value that is not UTF-8, every time
        # (the walsender, and the slot stays there; a read of the queue). SQL_ASCII
        # turns the check off. The stream is read as bytes (capture/pgoutput.py), the
        # rows as raw text (pg/raw_text.py): such a value is one change's dead letter.
        settings.append(("client_encoding", raw_text.ENCODING))
        if kind.raw_text:
            raw_text.adapt(conn)
    if kind.keepalives and not kind.options:
        settings += keepalive.SET_SETTINGS.items()
    return settings


def _server_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(Q.SERVER_PID.sql).fetchone()
    if not conn.autocommit:
        conn.commit()  # (a transaction left open would keep its server connection)
    return int(row[0]) if row else 0


def _refuse_pooling(
    conn: psycopg.Connection[Any],
    open_other: Callable[[], psycopg.Connection[Any]],
    session_pool: bool,
) -> bool:
    """Refuse a session that a pooler may move between server connections: before our
    SETs, which would stay on a server connection the pooler then hands to applications
    (search_path = pg_catalog broke their unqualified SQL, synchronous_commit = off their
    durability, statement_timeout their long queries: a review, through PgBouncer's
    transaction pool, after one `status`). The listener's session is also where the
    queue's lock and LISTEN live: there a stopped listener's lock stayed held, two
    listeners took it at once on one server connection, notifications were lost, and
    psycopg's prepared statements failed.

    PostgreSQL gives a session its own pid in the startup's cancel key; a pooler gives
    one of its own. Such a session is refused unless the configuration says the pooler
    keeps a session on one server connection (session_pool): nothing a client sees tells
    that for sure (a busy transaction pool passed a check now and then: third review).
    Then it is checked: while another session holds a transaction open (or waits for a
    server connection to open one), this one's next statement must run on the same
    server connection, at once. A transaction or statement pool hands the other session
    this one's server connection (the last released), or this one another, or makes it
    wait for one, or refuses the other's transaction block. True: a pooler, let
    through."""
    first = _server_pid(conn)
    if first == conn.info.backend_pid:
        return False  # nothing between
    if not session_pool:
        raise PoolerInTheWay(
            "database_url reaches PostgreSQL through a connection pooler or a proxy (the "
            f"session runs in server process {first}; its startup named "
            f"{conn.info.backend_pid}). cdc-invalidator's sessions need one server "
            "connection each, for good: the listener's holds the queue's lock and LISTENs, "
            "and the settings every session sets would reach the applications a "
            "transaction pool shares it with. If it is a pool in session mode, set "
            f"session_pool = true; else {POOLER_HELP}"
        )
    for _ in range(POOLER_ROUNDS):
        how = _moved(conn, first, open_other)
        if how is _KEPT:
            return True
        if how is not None:
            raise PoolerInTheWay(
                "session_pool is set, but the pooler database_url reaches moves a session "
                f"between server connections ({how}: a transaction or statement pool). "
                "cdc-invalidator's sessions need one server connection each: the "
                "listener's holds the queue's lock and LISTENs, and the settings every "
                f"session sets would reach the applications sharing the pool. {POOLER_HELP}"
            )
    return True


# What _moved() says when the session answered at once on its server connection while
# the other could get none: only a session that holds its own does (a session pool).
_KEPT = "kept its server connection while the pool had none to spare"


def _moved(
    conn: psycopg.Connection[Any], first: int, open_other: Callable[[], psycopg.Connection[Any]]
) -> str | None:
    """How `conn` (on backend `first`) left its server connection while another session
    held a transaction open or waited for a server connection; _KEPT if it stayed while
    the other waited (conclusive), None if it stayed while the other held one (it may
    have been given that one back: watched again). Both through libpq's asynchronous
    calls, each given POOLER_WAIT_S: a blocking one would wait on a full pool as long as
    the pooler lets it (PgBouncer's query_wait_timeout, 120 s)."""
    begin = ("BEGIN; " + Q.SERVER_PID.text).encode()
    other = open_other()
    try:
        try:
            taken = _pid_within(other.pgconn, begin, POOLER_WAIT_S)
        except psycopg.OperationalError as exc:
            # (PgBouncer's statement pool closes a session that opens a transaction)
            return f"it refused a transaction block: {' '.join(str(exc).split())}"
        if taken == first:
            return f"another session was given its server connection (backend {first})"
        now = _pid_within(conn.pgconn, Q.SERVER_PID.text.encode(), POOLER_WAIT_S)
        if taken is not None:
            other.pgconn.exec_(b"ROLLBACK")
    finally:
        other.close()
    if now is None:
        return "it had to wait for a server connection"
    if now != first:
        return f"it moved from backend {first} to backend {now}"
    return _KEPT if taken is None else None


def _pid_within(pgconn: psycopg.pq.abc.PGconn, query: bytes, timeout_s: float) -> int | None:
    """Send `query` (its last result one pid) and read its results; None if they did not
    all come within timeout_s (left unread: the connection is then closed)."""
    pgconn.send_query(query)
    deadline = time.monotonic() + timeout_s
    pid: int | None = None
    while True:
        while pgconn.is_busy():
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pgconn.socket], [], [], left)[0]:
                return None
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return pid
        if result.ntuples == 1:
            value = result.get_value(0, 0)
            pid = int(value) if value is not None else None


def _refuse_standby(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(Q.IN_RECOVERY.sql).fetchone()
    if row and row[0]:
        raise InRecovery(
            f"the server ({conn.info.host}:{conn.info.port}) is a standby, in recovery: "
            "waiting for it to be promoted or for database_url to reach the primary (with "
            "several hosts, target_session_attrs=read-write)"
        )
