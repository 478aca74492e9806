"""CPU runners: ai-edge-litert (default dependency) or tflite_runtime (Coral's Debian packages)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from segd.errors import ModelError, RuntimeUnavailable
from segd.runtime.base import InterpreterRunner
from segd.runtime.tpu_worker import (  # name -> (interpreter module, distribution)
    RUNTIMES,
    runtime_label,
)
from segd.settings import env_runtime


def runtime_module(name: str | None = None) -> tuple[str, ModuleType]:
    """The interpreter module of ``name`` or, by default, ``SEGD_RUNTIME`` or the first installed."""
    name = name or env_runtime()
    candidates = [name] if name else list(RUNTIMES)
    errors = []
    for cand in candidates:
        if cand not in RUNTIMES:
            raise RuntimeUnavailable(f"unknown runtime {cand!r}; choose one of {', '.join(RUNTIMES)}")
        try:
            return cand, importlib.import_module(RUNTIMES[cand][0])
        except ImportError as exc:
            errors.append(f"{cand}: {exc}")
    raise RuntimeUnavailable(
        "no TFLite runtime importable (" + "; ".join(errors) + "); install ai-edge-litert "
        "(pip) or python3-tflite-runtime (Coral apt repository)"
    )


def available_runtimes() -> dict[str, str | None]:
    """Installed runtimes and their versions (None when not installed)."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name, (module, dist) in RUNTIMES.items():
        try:
            importlib.import_module(module)
            found[name] = metadata.version(dist)
        except ImportError:
            found[name] = None
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def make_interpreter(
    module: ModuleType, model_content: bytes, *, num_threads: int | None, delegates: list[Any] | None = None
) -> Any:
    """Build and allocate an interpreter; model problems become ModelError."""
    try:
        interp = module.Interpreter(
            model_content=model_content,
            num_threads=num_threads,
            experimental_delegates=delegates or None,
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"runtime refused the model: {exc}") from exc
    return interp


def open_cpu(
    model_content: bytes, *, runtime: str | None = None, num_threads: int | None = None
) -> InterpreterRunner:
    name, module = runtime_module(runtime)
    threads = num_threads or os.cpu_count() or 1
    interp = make_interpreter(module, model_content, num_threads=threads)
    return InterpreterRunner(interp, backend="cpu", runtime=runtime_label(name))
