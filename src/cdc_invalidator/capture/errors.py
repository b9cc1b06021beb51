"""What a capture tells the runner besides events: stop for good, or wait a turn."""

from __future__ import annotations

from typing import TypeVar

_T = TypeVar("_T")


class Fatal(Exception):
    """This listener cannot consume the source: retrying would not help, a person must
    act (run `install`, pick another slot name, upgrade). The message says what."""


class NotInstalled(Fatal):
    """Our SQL is missing or from another version: the DBA must run `install`."""


class MappingSuperseded(Fatal):
    """A later `install` replaced the mapping this listener runs (sql/schema.sql,
    mapping_v1): it would render newer capture with older templates."""


SUPERSEDED = (
    "a later `install` replaced this listener's mapping, or ran with another one after its "
    "file was written: the database captures for another configuration than this "
    "listener's file holds (a listener, or a standby, not yet given the new file?)"
)


class Standby(Exception):
    """Another listener holds the source (queue lock, replication slot); wait a turn.
    `foreign`: said when what holds it is not a listener of ours (a psql session holding
    the queue's lock, a transaction a new slot waits for), which keeps every listener
    waiting until it ends; logged once per holder as `event`."""

    def __init__(
        self,
        reason: str,
        foreign: str | None = None,
        event: str = "standby_behind_a_foreign_session",
    ) -> None:
        super().__init__(reason)
        self.foreign = foreign
        self.event = event


def returned(value: _T | None, what: str) -> _T:
    """What PostgreSQL returned where it always returns something (the row of a query
    that selects one row whatever the state, the position of a new slot): a missing one
    is a clear Fatal naming it, not an assert (gone under python -O, a bare error)."""
    if value is None:
        raise Fatal(f"PostgreSQL returned no {what}")
    return value


def missing_privilege(user: str, capture: str, error: object) -> Fatal:
    """A privilege on our objects refused: the DBA grants it, once (docs/DBA.md)."""
    return Fatal(
        f"role {user!r} lacks a privilege the listener needs ({error}): as the role that "
        f"installed cdc_invalidator, run SELECT cdc_invalidator.grant_listener({user!r}, "
        f"{capture!r}), or run the listener as that role"
    )
