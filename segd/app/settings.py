"""The daemon's settings live in :mod:`segd.settings` (non-app code needs them too); this name
is kept for existing imports."""

from segd.settings import Settings, load_settings, validate

__all__ = ["Settings", "load_settings", "validate"]
