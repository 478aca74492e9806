"""Compatibility name for :mod:`segd.tflite.compiler` (the code lives there)."""

from segd.tflite.compiler import *  # noqa: F403
