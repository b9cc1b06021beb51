"""runtime.py: the process-wide memory settings the listener makes before its loop.

Each runs in a child interpreter: they change the whole process, and the test's own
must stay as it is."""

from __future__ import annotations

import subprocess
import sys

from cdc_invalidator.runtime import GC_YOUNG_THRESHOLD

# After a freed 8 MiB block, is a new 1 MiB one mapped on its own (given back to the
# system when freed) or carved from the heap? glibc's mallinfo2() counts the bytes in
# mapped blocks (hblkhd); Python's bytearray takes its buffer from malloc.
MAPPED_AFTER_A_BIG_FREE = """
import ctypes, sys
from cdc_invalidator import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    runtime.tune_malloc()
big = bytearray(8 << 20)
del big
before = libc.mallinfo2().hblkhd
block = bytearray(1 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def _mapped_bytes(how: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MAPPED_AFTER_A_BIG_FREE, how],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_tune_malloc_keeps_big_blocks_mapped_after_a_bigger_one_was_freed() -> None:
    # glibc's own moving threshold: the freed 8 MiB block raised it, the 1 MiB block
    # comes from the heap (which is what kept a bulk statement's memory after it).
    assert _mapped_bytes("untuned") == 0
    # Pinned at 128 KiB: mapped on its own, so freeing it returns it to the system.
    assert _mapped_bytes("tuned") >= 1 << 20


def test_tune_gc_freezes_startup_objects_and_collects_the_young_less_often() -> None:
    code = (
        "import gc; from cdc_invalidator import runtime; runtime.tune_gc(); "
        "print(gc.get_freeze_count(), gc.get_threshold()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    frozen, young = int(out[0]), int(out[1])
    assert frozen > 1_000  # the modules and objects built to start
    assert young == GC_YOUNG_THRESHOLD
