"""structlog setup. Only the CLI (and the demo, for its own run) calls configure();
library code just gets a logger."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

from cdc_invalidator.redact import Scrubber

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(
    level: str = "info",
    fmt: str = "auto",
    scrubber: Scrubber | None = None,
    to: Literal["stdout", "stderr"] = "stdout",
) -> None:
    """JSON lines when stdout is not a terminal (containers, systemd), console otherwise.

    Once per process: each module's logger is cached on its first use with the
    configuration of that moment (its level, its stream's name and the secrets it
    hides), for the cost of a log call on the path from a commit to its delete; a later
    call does not reach the loggers already used."""
    stream: TextIO = getattr(sys, to)
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    scrub = scrubber or Scrubber()

    def scrub_value(value: object) -> object:
        if isinstance(value, str):
            return scrub(value)
        if isinstance(value, BaseException):
            return scrub(f"{type(value).__name__}: {value}")
        # Lists and mappings too (the sentinels' addresses, a server's identity).
        if isinstance(value, list | tuple):
            return [scrub_value(v) for v in value]
        if isinstance(value, dict):
            return {k: scrub_value(v) for k, v in value.items()}
        return value

    def scrub_secrets(
        _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            event_dict[key] = scrub_value(value)
        return event_dict

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_args: _StreamLogger(to),
        cache_logger_on_first_use=True,
    )


class _StreamLogger:
    """Writes each line to sys.stdout or sys.stderr as it is when the line is written, not
    when logging was configured: loggers are cached on first use, and whoever replaced
    the stream since (a host program, a test harness) may have closed the old one. A
    listener must not die of a log line."""

    _lock = threading.Lock()  # one line at a time, whichever thread logs

    def __init__(self, to: str) -> None:
        self._to = to

    def msg(self, message: str) -> None:
        stream = getattr(sys, self._to)
        with self._lock:
            stream.write(message + "\n")
            stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = msg
