"""Keep passwords out of logs and error messages."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A URL or libpq keyword DSN with its password replaced by ***."""
    url = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + MASK, url)


def secrets_of(*urls: str) -> list[str]:
    """The passwords held by these URLs or DSNs, to scrub from any text."""
    found: list[str] = []
    for url in urls:
        if not url:
            continue
        if "://" in url:
            url_password = urlsplit(url).password
            if url_password:
                found.extend({url_password, unquote(url_password)})
            continue
        password: object
        try:
            password = conninfo_to_dict(url).get("password")
        except psycopg.ProgrammingError:  # an unparsable DSN holds no password we can find
            continue
        if isinstance(password, str) and password:
            found.append(password)
    return found


class Scrubber:
    """Replaces known secrets and URL passwords in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = redact_url(text)
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text
