"""TCP keepalives on the listener's PostgreSQL connections, both ways.

The consuming listener holds the advisory lock (trigger mode) or the slot (logical mode)
through its session: when its host vanishes or the network drops without a FIN, the
server would keep that session, and with it the lock or the slot, until the kernel's
default keepalive gives up (two hours). Probing an idle connection every second and
giving up after two unanswered probes lets the server end the session within ~3 s, so
a standby (polling every poll_interval_ms) takes over within 5 s. The same on our side
lets the listener notice a server that vanished and reconnect.
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

# Our side: libpq connection parameters.
CLIENT_PARAMS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
}


def conninfo(url: str, options: str = "") -> str:
    """`url` with our side's keepalives; with `options` (added to any the URL has), the
    server's keepalives go there too. Without, SET SERVER_SETTINGS once connected (the
    connection factory, pg/connect.py, does): a startup `options` parameter is refused by
    poolers such as PgBouncer."""
    if not options:
        return make_conninfo(url, **CLIENT_PARAMS)
    given = str(conninfo_to_dict(url).get("options") or "")
    merged = " ".join(o for o in (given, options, SERVER_OPTIONS) if o)
    return make_conninfo(url, options=merged, **CLIENT_PARAMS)
