"""The listener process's memory management, set once before its loop starts: the
garbage collector's thresholds, and the C allocator's (glibc malloc) mmap threshold."""

from __future__ import annotations

import ctypes
import gc

import structlog

log = structlog.get_logger(__name__)

# Garbage collections of the youngest generation come every this many new container
# objects (Python's default: 700), a full one more rarely again.
GC_YOUNG_THRESHOLD = 10_000

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter (malloc.h)
# Blocks at least this large are mapped on their own, and unmapped when freed. glibc's
# threshold starts at 128 KiB too, but rises to the largest mapped block freed (up to
# 32 MiB): after a bulk statement's first multi-megabyte buffers (joined keys, history
# text, packed UNLINKs) every later one came from the heap, which does not shrink
# around what is still in use. Set, it no longer moves.
MMAP_THRESHOLD_BYTES = 128 << 10


def tune_gc() -> None:
    """Set the collector for the loop: what the process built to start (modules,
    settings, clients: some 65,000 objects) is frozen out of every collection, and the
    youngest generation is collected less often. A batch of 5,000 changes creates some
    10,000 short-lived dicts and tuples; decoding one took 0.163 s of CPU for 20 batches
    with Python's defaults, 0.085 s with these (its collections walked the startup
    objects again and again). Garbage is still collected, in fewer, larger passes."""
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def tune_malloc() -> None:
    """Keep glibc malloc's mmap threshold where it starts. Measured on a logical-mode
    listener through three streamed 1M-row statements (UPDATE, DELETE, INSERT ...
    SELECT): peak RSS 101-103 MB with glibc's moving threshold (three runs), 85-92 MB
    with it fixed at 128 KiB (four runs), 95 MB at 1 MiB; between statements 69-76 MB
    instead of 93-102: the memory went back to the system. The keys were gone as soon
    (within the runs' spread). Limiting malloc's arenas to two changed nothing alone.
    Elsewhere (no glibc: no mallopt, or another allocator) nothing is changed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:  # 1: done
        log.debug("malloc_threshold_kept")
