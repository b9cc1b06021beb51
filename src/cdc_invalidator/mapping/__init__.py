"""Mapping: a pure function from a row change to the Redis keys that cache it."""

from cdc_invalidator.mapping.mapper import Invalidation, Mapper, Routed, merge
from cdc_invalidator.mapping.templates import KeyTemplate, TemplateError

__all__ = ["Invalidation", "KeyTemplate", "Mapper", "Routed", "TemplateError", "merge"]
