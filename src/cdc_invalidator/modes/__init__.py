"""The capture modes, trigger and logical: one object per mode (modes/choose.py picks it
from the settings) for everything that differs between them outside capture/."""
