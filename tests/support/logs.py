"""Log lines of code run in the test's own process, as structlog event dicts."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from structlog._config import BoundLoggerLazyProxy
from structlog.testing import capture_logs  # noqa: TID251 - the one place that wraps it


@contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog's capture_logs, made to see every module's lines whatever ran before.

    The listener's logging caches each module's logger on its first use (logs.py), and
    a cached logger keeps the configuration it was first used under: after an earlier
    test of the same worker ran the CLI in-process, or captured the same module's lines,
    capture_logs saw nothing of that module (its line went to stderr, or to the old
    capture) and the test failed by the order tests ran in. The cached loggers are
    dropped on the way in, so they take the capture, and on the way out, so none keeps
    it. Every level is captured: the CLI's configuration filters below a warning, and an
    earlier in-process command would otherwise hide an info line from the capture."""
    wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    forget_cached_loggers()
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=wrapper)
        forget_cached_loggers()


def forget_cached_loggers() -> None:
    for name, module in list(sys.modules.items()):
        if not name.startswith("cdc_invalidator"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, BoundLoggerLazyProxy):
                # Caching rebinds `bind` on the proxy itself: removing it restores the
                # class's, which assembles a logger from the configuration of the day.
                vars(value).pop("bind", None)
