"""Capture: where row changes come from (the trigger queue; logical decoding later)."""
