"""Which PostgreSQL servers the code accepts: `check` and `install` refuse an older one
before anything else, naming the version found and the oldest supported (docs/DBA.md,
"Supported PostgreSQL versions"), rather than failing halfway on a missing type."""

from __future__ import annotations

# Trigger mode's queue and position are xid8 and pg_snapshot (pg_current_xact_id(),
# pg_current_snapshot()), and status reads the slot's wal_status: all PostgreSQL 13.
OLDEST = 13
# Logical mode's publication carries column lists (CREATE PUBLICATION ... FOR TABLE t
# (a, b), pg_publication_rel.prattrs), which check and the DDL guard read: PostgreSQL 15.
OLDEST_LOGICAL = 15
# DETACH PARTITION ... CONCURRENTLY, and pg_inherits.inhdetachpending: PostgreSQL 14.
DETACH_CONCURRENTLY = 14
# Publications carry generated columns (publish_generated_columns): PostgreSQL 18.
PUBLISHED_GENERATED = 18
# The settings that end a session idle or a transaction by time, and since when
# PostgreSQL has them (idle_in_transaction_session_timeout: every accepted version).
IDLE_SESSION_TIMEOUT = 14
TRANSACTION_TIMEOUT = 17

_TWO_PART = 10  # from PostgreSQL 10 on, a version is major.minor


def format_version(server_version_num: int) -> str:
    """server_version_num as PostgreSQL prints it: 180006 -> "18.6", 90624 -> "9.6.24"."""
    major = server_version_num // 10000
    if major >= _TWO_PART:
        return f"{major}.{server_version_num % 10000}"
    return f"{major}.{server_version_num // 100 % 100}.{server_version_num % 100}"


def oldest_for(capture: str) -> int:
    """The oldest major version a capture mode ("trigger", "logical") runs on."""
    return OLDEST_LOGICAL if capture == "logical" else OLDEST


def refusal(server_version_num: int, capture: str) -> str | None:
    """Why a server of this version cannot serve this capture mode, or None if it can."""
    if server_version_num // 10000 >= oldest_for(capture):
        return None
    found = f"PostgreSQL {format_version(server_version_num)}"
    if server_version_num // 10000 < OLDEST:
        return (
            f"the server is {found}, older than the oldest supported, PostgreSQL {OLDEST} "
            "(cdc_invalidator needs its xid8 and pg_snapshot types): upgrade the server"
        )
    return (
        f"the server is {found}: logical capture needs PostgreSQL {OLDEST_LOGICAL} or later "
        f'(publication column lists); use capture = "trigger" (PostgreSQL {OLDEST} or '
        "later), or upgrade the server"
    )
