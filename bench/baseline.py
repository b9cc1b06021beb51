"""`make bench-baseline`: bench/baseline.json, the run every later run is compared with
(compare.py), written from the latest run (bench/results/latest.json), trimmed to its rows,
arguments, sizes, commit, machine and settings.

Refuses a partial run (--quick, --drain-only, one capture mode) unless given --force:
a baseline of other sizes or fewer rows compares with little.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from compare import BASELINE, describe, partial_reasons, trim

LATEST = Path(__file__).resolve().parent / "results" / "latest.json"


def write_baseline(latest: Path, baseline: Path, *, force: bool) -> str:
    """Writes baseline from latest; returns what it did. Raises ValueError saying why not."""
    try:
        payload = json.loads(latest.read_text())
    except FileNotFoundError:
        raise ValueError(f"no {latest}: run `make bench` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{latest} is unreadable: {exc}") from exc
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{latest} is not a bench result: no rows")  # noqa: TRY004 - a file, not an argument
    run = trim(payload)
    reasons = partial_reasons(run)
    if reasons and not force:
        raise ValueError(
            f"{latest} is not a full run ({'; '.join(reasons)}): run `make bench` without "
            "those options, or write it anyway with `make bench-baseline BASELINE_ARGS=--force`"
        )
    baseline.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n")
    return f"written {baseline} from `{run['argv']}` ({describe(run)}, {len(run['rows'])} rows)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="write it from a partial run too")
    parser.add_argument("--latest", type=Path, default=LATEST, help=f"default: {LATEST}")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help=f"default: {BASELINE}")
    args = parser.parse_args(argv)
    try:
        print(write_baseline(args.latest, args.baseline, force=args.force))
    except ValueError as exc:
        print(f"bench-baseline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
