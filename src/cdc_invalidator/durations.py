"""Durations as people write them in a config file or on the command line: "15m"."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str | float) -> float:
    """Seconds in "90s", "15m", "1h30m", "500ms", "2d" (a bare number is seconds).
    ValueError names what is wrong."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    if not isinstance(text, str):
        # ValueError, not TypeError: pydantic reports only ValueError as a config error.
        raise ValueError(f"expected a duration such as '15m', got {type(text).__name__}")  # noqa: TRY004
    spec = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        return float(spec)
    pos, total = 0, 0.0
    for match in _PART.finditer(spec):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not spec or pos != len(spec):
        raise ValueError(
            f"{text!r} is not a duration: write a number with a unit (ms, s, m, h, d), "
            "such as '90s', '15m' or '1h30m'"
        )
    return total


def format_duration(seconds: float) -> str:
    """A short human form: 0.5s, 90s, 15m, 1h30m."""
    if seconds < _UNITS["m"]:
        return f"{seconds:g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return out + (f"{secs}s" if secs else "")
