"""`make chaos`: `python -m tests.chaos [options]`, the long chaos run that prints a table;
`python -m tests.chaos --staleness [options]`, quiet runs measuring the stale-set race.

The engine, and what it runs and why its check is sound, is tests/support/chaos.py; the
staleness runs are tests/support/staleness.py.
"""

from __future__ import annotations

import sys

from tests.support import chaos, staleness


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--staleness" in args:
        return staleness.main([a for a in args if a != "--staleness"])
    return chaos.main(args)


if __name__ == "__main__":
    sys.exit(main())
