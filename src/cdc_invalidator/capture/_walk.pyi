# capture/_walk.c: the compiled tuple walks of capture/pgoutput.py.
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
