"""Read-only views of a ``.tflite`` flatbuffer, without TensorFlow.

The parsed model is the flatbuffers *object API* (``ModelT``) from
``ai_edge_litert.schema_py_generated``; the helpers here turn its raw tables into small frozen
records (ops with their tensors, shapes, dtypes, quantization) and constant buffers into numpy
arrays, which is what the checker, the surgery and the weight import need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

__all__ = [
    "OpInfo",
    "QuantParams",
    "TensorInfo",
    "builtin_code",
    "dequantize",
    "find_tensor",
    "list_ops",
    "op_name",
    "read_model",
    "subgraph_inputs",
    "subgraph_outputs",
    "tensor_data",
    "tensor_info",
]

#: BuiltinOperator value -> name ("CONV_2D", ...).
BUILTIN_NAMES: dict[int, str] = {
    v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")
}
#: TensorType value -> name ("UINT8", ...).
TENSOR_TYPE_NAMES: dict[int, str] = {
    v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")
}
#: TensorType name -> numpy dtype, for the types whose bytes map 1:1 onto numpy.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "FLOAT32": np.dtype("<f4"),
    "FLOAT16": np.dtype("<f2"),
    "FLOAT64": np.dtype("<f8"),
    "INT8": np.dtype("i1"),
    "UINT8": np.dtype("u1"),
    "INT16": np.dtype("<i2"),
    "UINT16": np.dtype("<u2"),
    "INT32": np.dtype("<i4"),
    "UINT32": np.dtype("<u4"),
    "INT64": np.dtype("<i8"),
    "UINT64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
    "COMPLEX64": np.dtype("<c8"),
    "COMPLEX128": np.dtype("<c16"),
}


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization ``real = scale * (q - zero_point)``, per tensor or per channel."""

    scale: np.ndarray = field(repr=False)
    zero_point: np.ndarray = field(repr=False)
    axis: int = 0

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    def __repr__(self) -> str:
        if self.per_channel:
            return f"QuantParams(per_channel n={self.scale.size}, axis={self.axis})"
        return (
            f"QuantParams(scale={float(self.scale[0]):.6g}, zero_point={int(self.zero_point[0])})"
        )


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a subgraph, as the graph declares it."""

    index: int
    name: str
    shape: tuple[int, ...]
    #: ``shape_signature`` when the file has one: -1 marks a dimension unknown until run time.
    shape_signature: tuple[int, ...] | None
    type_name: str
    quantization: QuantParams | None
    buffer: int
    #: True when the tensor's data is stored in the file (weights, biases, size vectors).
    is_constant: bool

    @property
    def dtype(self) -> np.dtype[Any] | None:
        return NUMPY_DTYPES.get(self.type_name)

    @property
    def is_dynamic(self) -> bool:
        dims = self.shape_signature if self.shape_signature is not None else self.shape
        return any(d < 0 for d in dims)


@dataclass(frozen=True)
class OpInfo:
    """One operator: its name, version, tensors and (object-API) builtin options."""

    index: int
    name: str
    builtin_code: int
    custom_code: str | None
    version: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    options: dict[str, Any]

    @property
    def is_custom(self) -> bool:
        return self.custom_code is not None


def read_model(model_bytes: bytes | bytearray | memoryview) -> schema.ModelT:
    """Parse ``.tflite`` bytes into the mutable object API; raise ValueError if they are not one."""
    data = bytes(model_bytes)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (missing 'TFL3' file identifier)")
    try:
        return schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as exc:  # flatbuffers raises bare struct/index errors on corrupt input
        raise ValueError(f"corrupt TFLite flatbuffer: {exc}") from exc


def builtin_code(opcode: schema.OperatorCodeT) -> int:
    """The operator code: schema v3a split it into a deprecated int8 field and an int32 field.

    Old writers fill only ``deprecated_builtin_code`` (<= 127); new ones fill both, and codes
    above 127 live only in ``builtin_code``. The larger of the two is the real one.
    """
    return max(int(opcode.deprecatedBuiltinCode), int(opcode.builtinCode))


def _decode(name: bytes | str | None) -> str:
    if name is None:
        return ""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


def op_name(model: schema.ModelT, opcode_index: int) -> str:
    """``CONV_2D`` for builtins, the custom code (``edgetpu-custom-op``) for custom ops."""
    opcode = model.operatorCodes[opcode_index]
    code = builtin_code(opcode)
    if code == schema.BuiltinOperator.CUSTOM:
        return _decode(opcode.customCode) or "CUSTOM"
    return BUILTIN_NAMES.get(code, f"BUILTIN_{code}")


def _buffer_has_data(model: schema.ModelT, buffer_index: int) -> bool:
    if buffer_index <= 0 or buffer_index >= len(model.buffers or []):
        return False
    buf = model.buffers[buffer_index]
    if buf.data is not None and len(buf.data) > 0:
        return True
    return int(buf.offset or 0) > 1 and int(buf.size or 0) > 0


def _quant(q: schema.QuantizationParametersT | None) -> QuantParams | None:
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scale = np.asarray(q.scale, dtype=np.float32).reshape(-1)
    zp = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0], dtype=np.int64).reshape(-1)
    if zp.size == 1 and scale.size > 1:
        zp = np.full(scale.shape, zp[0], dtype=np.int64)
    return QuantParams(scale=scale, zero_point=zp, axis=int(q.quantizedDimension or 0))


def _subgraph(model: schema.ModelT, subgraph: int) -> schema.SubGraphT:
    if not model.subgraphs or subgraph >= len(model.subgraphs):
        raise ValueError(f"model has no subgraph {subgraph}")
    return model.subgraphs[subgraph]


def tensor_info(model: schema.ModelT, index: int, subgraph: int = 0) -> TensorInfo:
    """Describe tensor ``index`` of ``subgraph``."""
    t = _subgraph(model, subgraph).tensors[index]
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
    sig = tuple(int(d) for d in t.shapeSignature) if t.shapeSignature is not None else None
    return TensorInfo(
        index=index,
        name=_decode(t.name),
        shape=shape,
        shape_signature=sig,
        type_name=TENSOR_TYPE_NAMES.get(int(t.type), f"TYPE_{t.type}"),
        quantization=_quant(t.quantization),
        buffer=int(t.buffer),
        is_constant=_buffer_has_data(model, int(t.buffer)),
    )


def list_ops(model: schema.ModelT, subgraph: int = 0) -> list[OpInfo]:
    """All operators of ``subgraph`` in execution order, with their tensors described."""
    sg = _subgraph(model, subgraph)
    cache: dict[int, TensorInfo] = {}

    def info(i: int) -> TensorInfo:
        if i not in cache:
            cache[i] = tensor_info(model, i, subgraph)
        return cache[i]

    ops = []
    for k, op in enumerate(sg.operators or []):
        opcode = model.operatorCodes[op.opcodeIndex]
        code = builtin_code(opcode)
        custom = _decode(opcode.customCode) if code == schema.BuiltinOperator.CUSTOM else None
        options = dict(vars(op.builtinOptions)) if op.builtinOptions is not None else {}
        ops.append(
            OpInfo(
                index=k,
                name=op_name(model, op.opcodeIndex),
                builtin_code=code,
                custom_code=custom,
                version=int(opcode.version or 1),
                inputs=tuple(
                    info(int(i)) for i in (op.inputs if op.inputs is not None else ()) if i >= 0
                ),
                outputs=tuple(info(int(i)) for i in (op.outputs if op.outputs is not None else ())),
                options=options,
            )
        )
    return ops


def subgraph_inputs(model: schema.ModelT, subgraph: int = 0) -> list[TensorInfo]:
    sg = _subgraph(model, subgraph)
    return [
        tensor_info(model, int(i), subgraph) for i in (sg.inputs if sg.inputs is not None else ())
    ]


def subgraph_outputs(model: schema.ModelT, subgraph: int = 0) -> list[TensorInfo]:
    sg = _subgraph(model, subgraph)
    return [
        tensor_info(model, int(i), subgraph) for i in (sg.outputs if sg.outputs is not None else ())
    ]


def find_tensor(model: schema.ModelT, name: str, subgraph: int = 0) -> TensorInfo:
    """The tensor called ``name``; KeyError if there is none (names are unique in practice)."""
    for i, t in enumerate(_subgraph(model, subgraph).tensors or []):
        if _decode(t.name) == name:
            return tensor_info(model, i, subgraph)
    raise KeyError(name)


def tensor_data(model: schema.ModelT, tensor: TensorInfo | int, subgraph: int = 0) -> np.ndarray:
    """The stored values of a constant tensor, shaped, in the tensor's own dtype (a copy).

    Raises ValueError for tensors without stored data (activations) or whose type has no
    numpy equivalent (strings, int4).
    """
    info = tensor if isinstance(tensor, TensorInfo) else tensor_info(model, tensor, subgraph)
    if not info.is_constant:
        raise ValueError(f"tensor {info.name!r} has no constant data (it is computed at run time)")
    dtype = info.dtype
    if dtype is None:
        raise ValueError(f"tensor {info.name!r} has type {info.type_name}, which numpy cannot hold")
    buf = model.buffers[info.buffer]
    if buf.data is None or len(buf.data) == 0:
        raise ValueError(
            f"tensor {info.name!r} stores its data outside the flatbuffer (offset buffers); "
            "read it from the file bytes"
        )
    raw = np.asarray(buf.data, dtype=np.uint8)
    count = int(np.prod(info.shape)) if info.shape else 1
    if raw.size != count * dtype.itemsize:
        raise ValueError(
            f"tensor {info.name!r}: buffer has {raw.size} bytes, shape {info.shape} of "
            f"{info.type_name} needs {count * dtype.itemsize}"
        )
    return raw.view(dtype).reshape(info.shape).copy()


def dequantize(values: np.ndarray, quant: QuantParams | None) -> np.ndarray:
    """Real values of quantized ``values`` as float32 (per tensor, or per channel on ``axis``).

    With ``quant=None`` the values are returned as float32 unchanged: unquantized tensors are
    already real-valued.
    """
    x = np.asarray(values)
    if quant is None:
        return x.astype(np.float32)
    q = x.astype(np.float64)
    if not quant.per_channel:
        real = float(quant.scale[0]) * (q - float(quant.zero_point[0]))
        return real.astype(np.float32)
    axis = quant.axis if quant.axis >= 0 else x.ndim + quant.axis
    if not 0 <= axis < x.ndim or x.shape[axis] != quant.scale.size:
        raise ValueError(
            f"per-channel quantization with {quant.scale.size} scales on axis {quant.axis} "
            f"does not fit shape {x.shape}"
        )
    bshape = [1] * x.ndim
    bshape[axis] = quant.scale.size
    scale = quant.scale.astype(np.float64).reshape(bshape)
    zp = quant.zero_point.astype(np.float64).reshape(bshape)
    return (scale * (q - zp)).astype(np.float32)
