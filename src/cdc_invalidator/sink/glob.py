"""Redis glob patterns (`SCAN MATCH`, `KEYS`) matched on the client: several patterns
checked against every key of one SCAN pass, instead of one SCAN pass per pattern.

A translation to a regular expression of Redis's own `stringmatchlen()` (util.c, Redis
7.0), byte by byte, with its corners kept as the server has them rather than as fnmatch
or a shell would: `\\` escapes the next byte (inside a class too; a trailing one is
literal); `[^...]` negates; a range may be written backwards (`[z-a]`) and compares
*signed* chars (so `[a-\\xff]` is the bytes 0x00-0x61 and 0xff); `]` right after `[` ends
an empty class that matches nothing (`[^]` matches any byte); a `]` as a range's end
(`[a-]`) is that range's end, not the class's; an unterminated `[` is a class up to the
end of the pattern. `*` and `?` match any bytes, newlines included. The empty key
matches only `*` (SCAN skips matching for that one pattern). tests/test_sweeps.py checks
the translation against a real server's MATCH.
"""

from __future__ import annotations

import re
from collections.abc import Collection

_SPECIAL = frozenset(b"*?[\\")


def _signed(byte: int) -> int:
    """As C's (signed) char compares it."""
    return byte - 256 if byte & 0x80 else byte


def _class(pattern: bytes, i: int) -> tuple[str, int]:
    """The class starting after the `[` at pattern[i - 1]: its regex, and the index
    after it (stringmatchlen's loop, kept step by step)."""
    n = len(pattern)
    negate = i < n and pattern[i] == ord("^")
    if negate:
        i += 1
    members: set[int] = set()
    while True:
        if i + 1 < n and pattern[i] == ord("\\"):
            members.add(pattern[i + 1])
            i += 2
            continue
        if i >= n:
            break  # unterminated: the class is what was read
        if pattern[i] == ord("]"):
            i += 1
            break
        if i + 2 < n and pattern[i + 1] == ord("-"):
            start, end = _signed(pattern[i]), _signed(pattern[i + 2])
            if start > end:
                start, end = end, start
            members.update(value & 0xFF for value in range(start, end + 1))
            i += 3
            continue
        members.add(pattern[i])
        i += 1
    chosen = set(range(256)) - members if negate else members
    if not chosen:
        return "(?!)", i  # matches nothing (and consumes nothing: the key fails)
    return "[" + "".join(f"\\x{b:02x}" for b in sorted(chosen)) + "]", i


def glob_regex(pattern: bytes) -> str:
    """The regular expression (for bytes, DOTALL, fullmatch) that matches what Redis's
    MATCH `pattern` matches, the empty key aside (see match_any)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        byte = pattern[i]
        if byte == ord("*"):
            while i < n and pattern[i] == ord("*"):
                i += 1
            out.append(".*")
            continue
        if byte == ord("?"):
            out.append(".")
            i += 1
            continue
        if byte == ord("["):
            regex, i = _class(pattern, i + 1)
            out.append(regex)
            continue
        if byte == ord("\\") and i + 1 < n:
            i += 1
            byte = pattern[i]
        out.append(f"\\x{byte:02x}")
        i += 1
    return "".join(out)


def literal_prefix(pattern: bytes) -> bytes:
    """The bytes every match starts with: up to the first special character."""
    for i, byte in enumerate(pattern):
        if byte in _SPECIAL:
            return pattern[:i]
    return pattern


def escape(literal: bytes) -> bytes:
    """A glob matching `literal` exactly."""
    return b"".join(b"\\" + bytes([b]) if b in _SPECIAL else bytes([b]) for b in literal)


class GlobSet:
    """Several Redis globs, matched at once: `matches(key)` for keys of a SCAN page, and
    `match`, what to give SCAN's MATCH so that the server returns only candidates (the
    one pattern itself, or the patterns' common literal prefix followed by `*`; None when
    they share none)."""

    def __init__(self, patterns: Collection[str | bytes]) -> None:
        encoded = sorted({p if isinstance(p, bytes) else p.encode() for p in patterns})
        if not encoded:
            raise ValueError("no pattern to match")
        self.patterns = encoded
        self._star = b"*" in encoded  # matches every key, the empty one too
        alternatives = "|".join(f"(?:{glob_regex(p)})" for p in encoded)
        self._regex = re.compile(alternatives.encode(), re.DOTALL)
        self.match: bytes | None
        if len(encoded) == 1:
            self.match = encoded[0]
        else:
            prefixes = [literal_prefix(p) for p in encoded]
            common = _common_prefix(prefixes)
            self.match = escape(common) + b"*" if common else None
        # Every key SCAN returns for `match` matches the set when `match` is one of the
        # patterns: the only one, or one beside narrower ones (`user:*` beside
        # `user:email:*`, a common pair of templates). Then a page needs no matching
        # here: 0.95 s of a 2M-key sweep's 5.9 s, profiled.
        self._scan_exact = self._star or self.match in encoded

    def matches(self, key: bytes) -> bool:
        if not key:
            return self._star
        return self._regex.fullmatch(key) is not None

    def scanned(self, page: list[bytes]) -> list[bytes]:
        """The keys of a page that SCAN returned for `match`, that some pattern matches."""
        return page if self._scan_exact else self.select(page)

    def select(self, keys: list[bytes]) -> list[bytes]:
        """The keys of a page that some pattern matches."""
        if self._star:
            return keys
        fullmatch = self._regex.fullmatch
        return [key for key in keys if key and fullmatch(key) is not None]


def _common_prefix(values: list[bytes]) -> bytes:
    first, last = min(values), max(values)
    for i, byte in enumerate(first):
        if i >= len(last) or last[i] != byte:
            return first[:i]
    return first
