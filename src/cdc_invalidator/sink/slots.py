"""A Redis Cluster's hash slots for a batch of keys, and the RESP of their UNLINKs.

ClusterSink sends one UNLINK per hash slot (a multi-key UNLINK must stay within one),
and a batch of 10,000 keys spreads over about 7,000 slots. Both steps are in C
(sink/_slots.c) where it was built, with the same results: in Python they took about
15 ms per such batch on 2 vCPUs, a third of the listener's time in a cluster drain.
RedisSink packs its UNLINKs (500 keys each) here too. Without a C compiler the package
installs without it and these Python versions run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

import hiredis
from redis.crc import key_slot

Key = str | bytes
GroupBySlot = Callable[[Iterable[Key]], dict[int, list[Key]]]
PackUnlinks = Callable[[Sequence[list[Key]]], bytes]


def _group_by_slot(keys: Iterable[Key]) -> dict[int, list[Key]]:
    """Each key, as given, under its hash slot, slots in the order their first key came."""
    by_slot: dict[int, list[Key]] = {}
    for key in keys:
        by_slot.setdefault(key_slot(key if isinstance(key, bytes) else key.encode()), []).append(
            key
        )
    return by_slot


def _pack_unlinks(commands: Sequence[list[Key]]) -> bytes:
    """RESP for `UNLINK key ...`, one per list of keys (a str key as its UTF-8), by
    hiredis's packer (a dependency, so in every install; 5x slower than ours)."""
    # (hiredis's stub types the argument as a 1-tuple: any tuple of str is taken)
    return b"".join(hiredis.pack_command(("UNLINK", *keys)) for keys in commands)  # type: ignore[arg-type]


group_by_slot: GroupBySlot
pack_unlinks: PackUnlinks
try:  # sink/_slots.c, built at install where there is a C compiler (pyproject.toml)
    from cdc_invalidator.sink._slots import group_by_slot, pack_unlinks
except ImportError:  # pragma: no cover - the build without a C compiler
    group_by_slot, pack_unlinks = _group_by_slot, _pack_unlinks

# True where the C versions run.
NATIVE_SLOTS: Final = group_by_slot is not _group_by_slot
