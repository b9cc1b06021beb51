"""synchronous_standby_names read as PostgreSQL reads it: whether a walsender of ours may
be chosen as a synchronous standby (which would make every commit of the server wait
for the listener). `check` reports it as an error; the listener logs it as it streams."""

from __future__ import annotations

import re

# synchronous_standby_names: FIRST n (a, b), ANY n (a, b), n (a, b), or a list; a name
# is an identifier, quoted or not, or "*" for any.
_SYNC_METHOD = re.compile(r"^\s*(?:(?:FIRST|ANY)\s+)?\d+\s*\((.*)\)\s*$", re.IGNORECASE | re.DOTALL)


def names_standby(synchronous_standby_names: str, application_name: str) -> bool:
    """Whether a walsender of this application_name may be chosen as a synchronous
    standby: the setting lists "*" or the name (PostgreSQL compares them ignoring
    case, quoted or not)."""
    listed = synchronous_standby_names.strip()
    if match := _SYNC_METHOD.match(listed):
        listed = match.group(1)
    for raw in listed.split(","):
        name = raw.strip()
        if name == "*":
            return True
        if name[:1] == '"' == name[-1:] and name != '"':
            name = name[1:-1].replace('""', '"')
        if name.lower() == application_name.lower():
            return True
    return False
