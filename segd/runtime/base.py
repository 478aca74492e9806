"""The runner interface and its one implementation over a TFLite-style ``Interpreter``
(ai-edge-litert and tflite_runtime expose the same Python API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, d: dict[str, Any]) -> TensorSpec:
        scale, zero_point = d.get("quantization", (0.0, 0))
        return cls(
            name=str(d["name"]),
            index=int(d["index"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=np.dtype(d["dtype"]),
            scale=float(scale),
            zero_point=int(zero_point),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }


class Runner(Protocol):
    """One loaded model. ``run`` is not thread-safe: callers serialise it (one lock per runner)."""

    backend: str  # "cpu" | "edgetpu"
    runtime: str  # e.g. "ai-edge-litert 2.3.0"
    device: str | None
    input: TensorSpec
    output: TensorSpec

    def run(self, tensor: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def describe_runner(runner: Runner) -> dict[str, Any]:
    """What every runner reports about itself; runners that supervise a child add their state."""
    return {
        "backend": runner.backend,
        "runtime": runner.runtime,
        "device": runner.device,
        "input": runner.input.describe(),
        "output": runner.output.describe(),
    }


class InterpreterRunner:
    """Runner over an allocated interpreter with one input and one output."""

    def __init__(self, interpreter: Any, *, backend: str, runtime: str, device: str | None = None) -> None:
        self._interpreter = interpreter
        self.backend = backend
        self.runtime = runtime
        self.device = device
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"model has {len(inputs)} inputs and {len(outputs)} outputs; segd needs exactly one of each"
            )
        self.input = TensorSpec.from_details(inputs[0])
        self.output = TensorSpec.from_details(outputs[0])

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """Run on one input (with or without the batch dim); return the output without it."""
        if tensor.ndim == len(self.input.shape) - 1:
            tensor = tensor[None]
        self._interpreter.set_tensor(self.input.index, tensor)
        self._interpreter.invoke()
        out: np.ndarray = self._interpreter.get_tensor(self.output.index)
        return out[0] if out.shape[0] == 1 else out

    def describe(self) -> dict[str, Any]:
        return describe_runner(self)

    def close(self) -> None:
        self._interpreter = None
