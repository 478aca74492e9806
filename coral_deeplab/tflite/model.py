"""Compatibility name for :mod:`segd.tflite.model` (the code lives there)."""

from segd.tflite.model import *  # noqa: F403
