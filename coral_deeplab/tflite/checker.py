"""Compatibility name for :mod:`segd.tflite.checker` (the code lives there)."""

from segd.tflite.checker import *  # noqa: F403
