"""What a capture tells the runner besides events: stop for good, or wait a turn."""

from __future__ import annotations


class Fatal(Exception):
    """This listener cannot consume the source: retrying would not help, a person must
    act (run `install`, pick another slot name, upgrade). The message says what."""


class NotInstalled(Fatal):
    """Our SQL is missing or from another version: the DBA must run `install`."""


class Standby(Exception):
    """Another listener holds the source (queue lock, replication slot); wait a turn."""


def missing_privilege(user: str, capture: str, error: object) -> Fatal:
    """A privilege on our objects refused: the DBA grants it, once (docs/DBA.md)."""
    return Fatal(
        f"role {user!r} lacks a privilege the listener needs ({error}): as the role that "
        f"installed cdc_invalidator, run SELECT cdc_invalidator.grant_listener({user!r}, "
        f"{capture!r}), or run the listener as that role"
    )
