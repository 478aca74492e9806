"""Runtimes behind one small interface.

``open_cpu(model_bytes)`` gives a :class:`Runner` on the best CPU runtime installed
(ai-edge-litert, else tflite_runtime); ``segd.runtime.edgetpu`` opens the same interface with the
Edge TPU delegate. Callers only ever see ``Runner``.
"""

from __future__ import annotations

from segd.runtime.base import InterpreterRunner, Runner, TensorSpec
from segd.runtime.cpu import available_runtimes, open_cpu, runtime_module

__all__ = [
    "InterpreterRunner",
    "Runner",
    "TensorSpec",
    "available_runtimes",
    "open_cpu",
    "runtime_module",
]
