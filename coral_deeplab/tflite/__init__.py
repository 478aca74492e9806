"""Compatibility names: the TensorFlow-free ``.tflite`` tools live in :mod:`segd.tflite`
(serving needs them and ``segd`` never imports ``coral_deeplab``). Kept because the README and
earlier code import ``coral_deeplab.tflite`` and ``coral_deeplab.tflite.checker``."""

from segd.tflite import *  # noqa: F403
from segd.tflite import __all__ as __all__
