"""Stop requests: SIGTERM/SIGINT set a flag and wake any select() through a pipe (the
listener), or raise KeyboardInterrupt (the commands that run until stopped)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopper:
    """A stop flag and a pipe that becomes readable when it is set.

    stop() runs in a signal handler, which Python runs in the main thread between any two
    bytecodes, also while that thread holds a lock: so stop() takes none (a
    threading.Event's would deadlock when SIGTERM lands while the main thread is inside
    Event.wait()'s own critical section). A plain flag and a write to a non-blocking pipe
    are all it does; sleep() waits on the pipe with select().
    """

    def __init__(self) -> None:
        self._stopped = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def fileno(self) -> int:
        """Readable once stop() was called: add it to a select()."""
        return self._read_fd

    def stop(self) -> None:
        """Idempotent; safe from a signal handler or another thread."""
        self._stopped = True
        # A full pipe is already readable: nothing more to say. (The byte is never read:
        # the pipe stays readable, so every later select() returns at once.)
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"x")

    def sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True when stopped."""
        if not self._stopped and seconds > 0:
            select.select([self._read_fd], [], [], seconds)
        return self._stopped

    def install_signal_handlers(self) -> None:
        """From the main thread only (Python's rule for signal.signal)."""

        def handler(_signum: int, _frame: FrameType | None) -> None:
            self.stop()

        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


@contextlib.contextmanager
def stop_signals_handled(
    handler: Callable[[int, FrameType | None], object] | signal.Handlers,
) -> Iterator[None]:
    """Inside, SIGINT and SIGTERM go to `handler` (a function, or SIG_IGN), and what they
    went to before is set back after. Signal handlers are the main thread's to set: from
    any other, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def interrupted_by_signals() -> contextlib.AbstractContextManager[None]:
    """Inside, SIGINT and SIGTERM raise KeyboardInterrupt (`tail`, `demo`: Ctrl-C or a
    `kill` ends them cleanly), whatever the process was started with: a SIGINT its parent
    ignored (a shell's background job, `make test &`) stays ignored through exec, and
    Python then installs no handler of its own, so Ctrl-C did nothing to `tail`."""
    return stop_signals_handled(_interrupt)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt
