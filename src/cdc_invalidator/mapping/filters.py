"""Template filters: what apps do to a value before it goes into a key.

``user:email:{email|lower}`` renders the email lowercased; filters chain left to right
(``{code|trim|upper}``). Each is a pure function of the column's text, applied in the
listener, so both capture modes (which both deliver PostgreSQL's text form of a value)
render the same key. The set is what cache-key helpers commonly do to a key part:

- ``lower``, ``upper``: case-insensitive lookups (emails, usernames). Python's
  ``str.lower()``/``str.upper()``: Unicode-aware, as Ruby's ``downcase`` and PHP's
  ``mb_strtolower`` (Unicode's default case mapping, without a locale's special rules).
- ``trim``: strip leading and trailing whitespace (Python's ``str.strip()``: Unicode
  whitespace; Ruby's ``strip`` and PHP's ``trim`` strip only ASCII's, and NUL).
- ``md5``, ``sha1``, ``sha256``: the lowercase hex digest of the UTF-8 bytes: long or
  unsafe values made into a fixed-length key part (Django's
  ``make_template_fragment_key`` hashes with md5, Rails' ``ActiveSupport::Cache``
  truncates long keys with a SHA-256/MD5 suffix, Laravel's tags use sha1).
- ``urlencode``: percent-encode everything but RFC 3986's unreserved characters
  (``A-Z a-z 0-9 - . _ ~``) from the UTF-8 bytes, as Python's
  ``urllib.parse.quote(value, safe="")`` and PHP's ``rawurlencode``: keys that must hold
  no spaces, colons or control characters (memcached-safe keys).
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Callable, Mapping
from types import MappingProxyType

Filter = Callable[[str], str]


def _digest(name: str) -> Filter:
    def digest(value: str) -> str:
        return hashlib.new(name, value.encode(), usedforsecurity=False).hexdigest()

    return digest


def _urlencode(value: str) -> str:
    return urllib.parse.quote(value, safe="")


FILTERS: Mapping[str, Filter] = MappingProxyType(
    {
        "lower": str.lower,
        "upper": str.upper,
        "trim": str.strip,
        "md5": _digest("md5"),
        "sha1": _digest("sha1"),
        "sha256": _digest("sha256"),
        "urlencode": _urlencode,
    }
)


def chain(names: tuple[str, ...]) -> Filter | None:
    """One function applying `names` in order (None for none); names must be known."""
    functions = [FILTERS[name] for name in names]
    if not functions:
        return None
    if len(functions) == 1:
        return functions[0]

    def apply(value: str) -> str:
        for function in functions:
            value = function(value)
        return value

    return apply
