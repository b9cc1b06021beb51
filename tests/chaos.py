"""`make chaos`: `python -m tests.chaos [options]`, the long chaos run that prints a table.

The engine, and what it runs and why its check is sound, is tests/support/chaos.py.
"""

from __future__ import annotations

import sys

from tests.support.chaos import main

if __name__ == "__main__":
    sys.exit(main())
