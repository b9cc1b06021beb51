"""Every PostgreSQL session the tool opens, made in one place.

Each session gets the configured `database_url`, `application_name` (with a suffix that
says which session it is, in pg_stat_activity) and `connect_timeout`; a `Kind` adds what
that session needs: TCP keepalives both ways (capture/keepalive.py) for the sessions
that hold the lock or the slot, settings SET once connected (a startup `options`
parameter is refused by poolers such as PgBouncer), startup options for the replication
session (no pooler stands between it and the walsender).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from psycopg import sql

from cdc_invalidator.capture import keepalive
from cdc_invalidator.pg import raw_text
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
# How long a scrape's reading of the database may take: a hung database fails the
# reading (status_up 0) instead of holding the scrape and the collector's lock.
METRICS_STATEMENT_TIMEOUT = "5s"


class InRecovery(psycopg.OperationalError):
    """The server is a standby: it takes no writes, the listener's or the app's. After a
    failover the URL may name the old primary's address until DNS or a virtual IP moves
    (or name several hosts): a server down for the listener, which waits and retries."""


@dataclass(frozen=True, slots=True)
class Kind:
    """What one kind of session needs besides the URL, its name and connect_timeout."""

    suffix: str = ""  # added to application_name
    keepalives: bool = False  # a session whose end frees a lock or a slot
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
)
# Logical mode's ordinary session beside the stream: slot state, dead letters, history.
BOOKKEEPING = Kind(keepalives=True, settings=(NO_FSYNC_WAIT,), writes=True)
# Logical mode's stream (START_REPLICATION).
REPLICATION = Kind(
    keepalives=True, options=RENDER_OPTIONS, settings=WALSENDER_SETTINGS, replication=True
)
# Short-lived sessions beside the listener (replay's identity watch): they hold nothing,
# and are named apart from the listener's own session in pg_stat_activity.
SIDE = Kind(suffix="-side", raw_text=True)
# The metrics collector's session, read at scrape time.
METRICS = Kind(suffix="-metrics", settings=(("statement_timeout", METRICS_STATEMENT_TIMEOUT),))
# A one-shot command (install, check, status, ...).
CLI = Kind(suffix="-cli")
# The one that reads captured rows: replay.
REPLAY = Kind(suffix="-cli", raw_text=True)


class PgConnector:
    """Opens sessions of each kind for one database."""

    def __init__(self, database_url: str, *, application_name: str, connect_timeout_s: float):
        self.database_url = database_url
        self._application_name = application_name
        # libpq takes whole seconds; 0 would mean "wait forever".
        self._connect_timeout = max(1, round(connect_timeout_s))

    @classmethod
    def from_settings(cls, settings: Settings) -> PgConnector:
        return cls(
            settings.database_url,
            application_name=settings.application_name,
            connect_timeout_s=settings.connect_timeout_s,
        )

    def connect(self, kind: Kind, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        conninfo = self.database_url
        if kind.keepalives:
            conninfo = keepalive.conninfo(conninfo, kind.options)
        extra: dict[str, Any] = {"replication": "database"} if kind.replication else {}
        conn = psycopg.connect(
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
        settings = [SEARCH_PATH, *kind.settings]
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
        try:
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


def _refuse_standby(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(Q.IN_RECOVERY.sql).fetchone()
    if row and row[0]:
        raise InRecovery(
            f"the server ({conn.info.host}:{conn.info.port}) is a standby, in recovery: "
            "waiting for it to be promoted or for database_url to reach the primary (with "
            "several hosts, target_session_attrs=read-write)"
        )
