"""Keep passwords out of logs and error messages."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

MASK = "***"
# Shorter "secrets" are not masked: a one-letter password would mask that letter everywhere.
_MIN_SECRET_LENGTH = 3
# The password runs to the last "@" before the path: one written with an "@", "?" or "#"
# not percent-encoded (libpq and redis-py then split at the first "@", and their
# messages echo the rest as a host name) is masked whole. (An "@" in a query string
# after a host without a path masks more than the password: never less.) A space too:
# libpq refuses such a URL, and its message ("unexpected spaces found in ...") echoes it.
# Found from its "://", not from the scheme's letters before it (left as they are): a
# pattern that began with the scheme ([a-z][a-z0-9+.-]*://) was tried from every letter
# of a long word, to its end, and a key of 100 kB with no "://" took 12 s to print (1 MB,
# some 20 minutes: `keys`, `tail`, `explain` print through this). Any "://" counts, with
# a scheme or not: more masked, never less.
_URL_PASSWORD = re.compile(r"(?P<scheme>://)(?P<user>[^:/@\s]*):(?P<pw>[^/\n]*)@")
# A Redis URL's user info without a colon (redis://secret@host): redis-py takes it for a
# user name, but it is written where older clients took a password: masked whole.
_REDIS_USERINFO = re.compile(r"(?P<scheme>rediss?://)(?P<user>[^:/@\s]+)@", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# In a keyword string libpq cannot parse (an unquoted password with a space), the
# password as meant: up to the next "word=" or the end.
_LOOSE_PASSWORD = re.compile(r"password\s*=\s*(.*?)\s*(?=\s\w+\s*=|$)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A URL or libpq keyword DSN with its password replaced by ***."""
    url = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    url = _REDIS_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", url)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + MASK, url)


def secrets_of(*urls: str) -> list[str]:
    """The passwords held by these URLs or DSNs, to scrub from any text.

    Each as libpq reads it (percent-decoded, unquoted, or from a URL's ?password=) and
    as written (an error message may echo the text: libpq's "invalid percent-encoded
    token", for one), also when the text cannot be parsed at all.
    """
    found: set[str] = set()
    for url in urls:
        if not url:
            continue
        try:
            password = conninfo_to_dict(url).get("password")
            parsed = True
        except psycopg.ProgrammingError:  # a Redis URL, or text libpq cannot read
            password, parsed = None, False
        if isinstance(password, str):
            found.add(password)
        for m in _URL_PASSWORD.finditer(url):
            found.update((m["pw"], unquote(m["pw"])))
        for m in _REDIS_USERINFO.finditer(url):
            found.update((m["user"], unquote(m["user"])))
        for m in _KEYWORD_PASSWORD.finditer(url):
            value = m.group(2)
            found.update((value, value.strip("'").replace("\\'", "'").replace("\\\\", "\\")))
        for m in () if parsed else _LOOSE_PASSWORD.finditer(url):
            # Every word of it: libpq's complaint names the word it stumbled on.
            found.update((m.group(1), *m.group(1).split()))
    return sorted(s for s in found if s)


class Scrubber:
    """Replaces known secrets and URL passwords in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is masked whole.
        self._secrets = sorted(
            {s for s in secrets if len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        text = redact_url(text)
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text
