# capture/_walk.c: the compiled tuple walks of capture/pgoutput.py.
from collections.abc import Callable

class Walker:
    def __init__(
        self, ncols: int, wanted: tuple[tuple[int, str], ...], pair: bool = False
    ) -> None: ...
    # walk: ({name: text or None}, end); pair: (old, new, end); None for what it does
    # not take.
    def __call__(self, msg: bytes, pos: int, /) -> tuple[object, ...] | None: ...
    # A whole INSERT, UPDATE or DELETE message's wanted values appended column-wise to
    # `old` and `new` (one list per wanted column): 0 when not taken (nothing appended),
    # 1 taken, 2 an UPDATE whose wanted values changed, 3 an UPDATE without old tuple.
    def collect(
        self,
        msg: bytes,
        pos: int,
        old: tuple[list[object], ...] | None,
        new: tuple[list[object], ...] | None,
        keyed: bool,
        /,
    ) -> int: ...

# A chunk's streamed changes gathered into packs (capture/packs.py's Collector): take(msg)
# asks start(msg) about each new message head (type, xid, relation OID), which returns
# None or (pack, walker, old, new, positions, keyed); drain() hands back
# [(pack, changed, without_old)] and forgets them.
class Gatherer:
    def __init__(
        self,
        start: Callable[[bytes], tuple[object, ...] | None],
        decoder: object,
        limit: int,
        head: int = 9,
    ) -> None: ...
    def take(self, msg: bytes, /) -> bool: ...
    def drain(self) -> list[tuple[object, bool, bool]]: ...
    @property
    def size(self) -> int: ...
    limit: int
