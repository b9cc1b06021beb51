"""Mapping: a pure function from a row change to the Redis keys that cache it."""

from cdc_invalidator.mapping.mapper import (
    KEYS_SEP,
    Invalidation,
    Mapper,
    PackedKeys,
    Routed,
    merge,
    pack_keys,
    unpack_keys,
)
from cdc_invalidator.mapping.templates import KeyTemplate, TemplateError

__all__ = [
    "KEYS_SEP",
    "Invalidation",
    "KeyTemplate",
    "Mapper",
    "PackedKeys",
    "Routed",
    "TemplateError",
    "merge",
    "pack_keys",
    "unpack_keys",
]
