"""Stop requests: SIGTERM/SIGINT set a flag and wake any select() through a pipe."""

from __future__ import annotations

import contextlib
import os
import select
import signal
from types import FrameType


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

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)
