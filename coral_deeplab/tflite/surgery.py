"""Compatibility name for :mod:`segd.tflite.surgery` (the code lives there)."""

from segd.tflite.surgery import *  # noqa: F403
