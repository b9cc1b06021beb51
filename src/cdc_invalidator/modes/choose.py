"""The capture mode of the settings: the one place that reads `settings.capture`."""

from __future__ import annotations

from cdc_invalidator.modes.base import CaptureMode
from cdc_invalidator.modes.logical import LogicalMode
from cdc_invalidator.modes.trigger import TriggerMode
from cdc_invalidator.settings import Settings


def mode_for(settings: Settings) -> CaptureMode:
    modes: dict[str, type[TriggerMode | LogicalMode]] = {
        "trigger": TriggerMode,
        "logical": LogicalMode,
    }
    return modes[settings.capture](settings)
