"""TCP keepalives and user timeouts on the listener's PostgreSQL connections, both ways.

The consuming listener holds the advisory lock (trigger mode) or the slot (logical mode)
through its session: when its host vanishes or the network drops without a FIN, the
server would keep that session, and with it the lock or the slot, until the kernel's
default keepalive gives up (two hours). Probing an idle connection every second and
giving up after two unanswered probes lets the server end the session within ~3 s, so
a standby (polling every poll_interval_ms) takes over within 5 s. The same on our side
lets the listener notice a server that vanished and reconnect.

Keepalives only probe a connection with nothing in flight. Once the server has sent the
vanished host something (a NOTIFY for the next commit), the kernel retransmits instead,
for ~15 minutes (tcp_retries2), and keeps the session that long (measured with a host
whose link went down while changes were written: the lock was still held after 2
minutes, the slot freed after wal_sender_timeout). TCP_USER_TIMEOUT bounds that: data
unacknowledged for 3 s ends the connection, as 3 s of unanswered probes do.
Not on the walsender's side: there it would also end a healthy stream whose listener has
not read for 3 s (a long sweep, a Redis outage) while WAL kept coming, as soon as the
socket buffers are full (the kernel counts a zero window against it); a vanished
listener's walsender ends after wal_sender_timeout (60 s by default) instead.
"""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict, make_conninfo

# The server's side: session settings.
SERVER_SETTINGS = {
    "tcp_keepalives_idle": 1,
    "tcp_keepalives_interval": 1,
    "tcp_keepalives_count": 2,
}
SERVER_OPTIONS = " ".join(f"-c {name}={value}" for name, value in SERVER_SETTINGS.items())
# Data unacknowledged this long (ms) ends a connection, on both sides. On the server's,
# SET on the sessions that read what the server sends as it comes: every session with
# keepalives but the walsender's (its startup options are above).
USER_TIMEOUT_MS = 3000
SET_SETTINGS = {**SERVER_SETTINGS, "tcp_user_timeout": USER_TIMEOUT_MS}

# Our side: libpq connection parameters.
CLIENT_PARAMS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    # The listener notices a server that vanished under an unanswered query as quickly.
    "tcp_user_timeout": USER_TIMEOUT_MS,
}


def conninfo(url: str, options: str = "") -> str:
    """`url` with our side's keepalives; with `options` (added to any the URL has), the
    server's keepalives go there too. Without, SET SET_SETTINGS once connected (the
    connection factory, pg/connect.py, does): a startup `options` parameter is refused by
    poolers such as PgBouncer."""
    if not options:
        return make_conninfo(url, **CLIENT_PARAMS)
    given = str(conninfo_to_dict(url).get("options") or "")
    merged = " ".join(o for o in (given, options, SERVER_OPTIONS) if o)
    return make_conninfo(url, options=merged, **CLIENT_PARAMS)
