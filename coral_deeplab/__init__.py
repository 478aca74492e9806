"""Edge-TPU-clean DeepLab models and the tooling around them.

Importing the package is cheap and never imports TensorFlow: submodules (some of which do
need TensorFlow) load on first attribute access, so ``segd`` can use the TF-free parts such as
``coral_deeplab.tflite`` on a Raspberry Pi.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    """Load ``coral_deeplab.<name>`` lazily (PEP 562) so TensorFlow loads only when asked for."""
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
