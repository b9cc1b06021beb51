# capture/_walk.c: the compiled tuple walks of capture/pgoutput.py.
class Walker:
    def __init__(
        self, ncols: int, wanted: tuple[tuple[int, str], ...], pair: bool = False
    ) -> None: ...
    # walk: ({name: text or None}, end); pair: (old, new, end); None for what it does
    # not take.
    def __call__(self, msg: bytes, pos: int, /) -> tuple[object, ...] | None: ...
