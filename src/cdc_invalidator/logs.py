"""structlog setup. Only the CLI calls configure(); library code just gets a logger."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

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
    stream: TextIO | None = None,
) -> None:
    """JSON lines when stdout is not a terminal (containers, systemd), console otherwise."""
    stream = stream or sys.stdout
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
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
