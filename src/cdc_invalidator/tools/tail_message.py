"""What the listener tells `tail`: one JSON message per acknowledged batch, on a channel
named after the database, and how `tail` prints it.

A message: {"v": 1, "at": the acknowledgement, "events": [event, ...], "more": events
left out}, times as Unix time on the listener's clock; an event: {"table", "op",
"keys", "patterns" (a TRUNCATE's sweeps), "error" (a dead letter's reason, or absent),
"commit" (Unix time, or null), "txn", and for a sweep ("op" "T") that stands for
something else than a TRUNCATE, "shown_as" ("BULK": a statement of bulk_sweep_rows rows
or more; "UNRENDERABLE": changes the capture could not turn into key columns; "RESYNC":
every watched table after changes may have been missed, logical mode) and "why"}.
"commit" is the transaction's commit in logical mode and the start of the writer's
transaction in trigger mode (what the queue records), so commit → delete is the lag the
`lag_seconds` histogram measures. An older `tail` shows those sweeps as a TRUNCATE.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg.conninfo import conninfo_to_dict

CHANNEL_PREFIX = "cdc-invalidator:tail:"
VERSION = 1
# Events per message at most: a 5,000-event batch is summed up, not printed in full.
MAX_EVENTS = 1000
_OPS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}


def channel_name(database_url: str) -> str:
    """The channel of the database `database_url` names (libpq's default: the user's
    name): listeners of different databases sharing a Redis publish apart."""
    params = conninfo_to_dict(database_url)
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    return CHANNEL_PREFIX + str(params.get("dbname") or os.environ.get("PGDATABASE") or user)


@dataclass(frozen=True, slots=True)
class TailEvent:
    table: str
    op: str
    keys: list[str]
    patterns: list[str]
    error: str | None
    commit: float | None
    txn: str
    shown_as: str | None = None
    why: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "table": self.table,
            "op": self.op,
            "keys": self.keys,
            "commit": self.commit,
            "txn": self.txn,
        }
        if self.patterns:
            out["patterns"] = self.patterns
        if self.error is not None:
            out["error"] = self.error
        if self.shown_as is not None:
            out["shown_as"] = self.shown_as
        if self.why is not None:
            out["why"] = self.why
        return out


def encode(at: float, events: list[TailEvent], more: int) -> str:
    return json.dumps(
        {"v": VERSION, "at": at, "events": [e.as_json() for e in events], "more": more},
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class TailBatch:
    at: float
    events: list[TailEvent]
    more: int


def decode(text: str) -> TailBatch:
    """A message, or ValueError saying why it is none (another program's, another
    version's)."""
    try:
        data = json.loads(text)
        events = [
            TailEvent(
                table=str(e["table"]),
                op=str(e["op"]),
                keys=[str(k) for k in e.get("keys") or []],
                patterns=[str(p) for p in e.get("patterns") or []],
                error=None if e.get("error") is None else str(e["error"]),
                commit=None if e.get("commit") is None else float(e["commit"]),
                txn=str(e.get("txn") or ""),
                shown_as=None if e.get("shown_as") is None else str(e["shown_as"]),
                why=None if e.get("why") is None else str(e["why"]),
            )
            for e in data["events"]
        ]
        if data.get("v") != VERSION:
            raise ValueError(f"version {data.get('v')!r}, expected {VERSION}")
        return TailBatch(float(data["at"]), events, int(data.get("more") or 0))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a tail message: {type(exc).__name__}: {exc}") from None


def line(at: float, event: TailEvent) -> str:
    """One invalidation: delete time (UTC), table, operation, keys, commit → delete."""
    when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    what = " ".join(event.keys) if event.keys else "(no keys)"
    if event.patterns:
        what = " ".join(["sweep", *event.patterns, *event.keys])
    if event.why is not None:
        what = f"{what} ({event.why})"
    if event.error is not None:
        what = f"(dead letter: {event.error})"
    lag = (
        ""
        if event.commit is None
        else f" commit→delete {max(0.0, at - event.commit) * 1000:.0f} ms"
    )
    txn = f" ({event.txn})" if event.txn else ""
    op = event.shown_as or _OPS.get(event.op, event.op)
    return f"{when} {event.table} {op} {what}{lag}{txn}"
