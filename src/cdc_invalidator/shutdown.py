"""Stop requests: SIGTERM/SIGINT set a flag and wake any select() through a pipe."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType


class Stopper:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def fileno(self) -> int:
        """Readable once stop() was called: add it to a select()."""
        return self._read_fd

    def stop(self) -> None:
        """Idempotent; safe from a signal handler or another thread."""
        if not self._event.is_set():
            self._event.set()
            # A full pipe is already readable: nothing more to say.
            with contextlib.suppress(BlockingIOError):
                os.write(self._write_fd, b"x")

    def sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True when stopped."""
        return self._event.wait(seconds)

    def install_signal_handlers(self) -> None:
        """From the main thread only (Python's rule for signal.signal)."""

        def handler(_signum: int, _frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)
