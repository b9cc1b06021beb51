"""`status`: how far behind the listener is, read from the database."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from cdc_invalidator import sqlfiles


@dataclass(frozen=True, slots=True)
class Status:
    backlog: int
    oldest_pending_age_s: float | None
    dead_letters: int
    last_processed_at: datetime | None
    events_processed: int
    notify_queue_usage: float

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["last_processed_at"] = (
            self.last_processed_at.isoformat() if self.last_processed_at else None
        )
        return data

    def lines(self) -> list[str]:
        age = "-" if self.oldest_pending_age_s is None else f"{self.oldest_pending_age_s:.3f} s"
        last = self.last_processed_at.isoformat() if self.last_processed_at else "never"
        return [
            f"backlog:              {self.backlog} events",
            f"oldest pending age:   {age}",
            f"dead letters:         {self.dead_letters}",
            f"last processed at:    {last}",
            f"events processed:     {self.events_processed}",
            f"NOTIFY queue usage:   {self.notify_queue_usage:.1%}",
        ]


def read_status(conn: psycopg.Connection[Any]) -> Status:
    row = conn.execute(sqlfiles.query("status.sql")).fetchone()
    if row is None:
        raise RuntimeError("cdc_invalidator.listener_state_v1 is empty: run `install` again")
    backlog, age, dead, last, processed, notify_usage = row
    return Status(int(backlog), age, int(dead), last, int(processed), float(notify_usage))
