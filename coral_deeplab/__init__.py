"""Edge-TPU-clean DeepLab models and the tooling around them.

Importing the package is cheap and never imports TensorFlow: submodules (some of which do
need TensorFlow) load on first attribute access, so ``segd`` can use the TF-free parts such as
``coral_deeplab.tflite`` on a Raspberry Pi.
"""

from __future__ import annotations

import importlib
from typing import Any

# Convenience names re-exported lazily: attribute -> submodule that defines it. Touching one
# of these imports that submodule (and TensorFlow, for the keras ones) on first use only.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "CoralDeepLabV3": "applications",
    "CoralDeepLabV3Plus": "applications",
    "to_tflite": "export",
    "from_precompiled": "zoo",
}


def __getattr__(name: str) -> Any:
    """Load ``coral_deeplab.<name>`` (or the submodule defining ``name``) lazily (PEP 562)."""
    if name.startswith("_"):
        raise AttributeError(name)
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(f"{__name__}.{_LAZY_ATTRIBUTES[name]}")
        return getattr(module, name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
