"""Cut the resize/argmax tail off a segmentation model so it outputs its logits.

DeepLab files end in ``logits -> RESIZE_BILINEAR (-> RESIZE_BILINEAR) -> ARG_MAX``. On a
Raspberry Pi that tail costs more than the network: it upsamples 21 channels to 513x513 and
runs an argmax over them, on the CPU, for a mask segd then resizes again. segd instead takes the
small logits tensor and does one exact upsample+argmax at the image's own size. This module
rewrites the flatbuffer so the graph ends at the logits, without TensorFlow.

It works on compiled ``*_edgetpu.tflite`` files too: the ``edgetpu-custom-op`` is kept as it is,
and its ``custom_options`` (the compiled Edge TPU executable the delegate loads) are copied
byte for byte.

What the rewrite does:
- the subgraph's single output becomes the tensor feeding the tail chain, with its name kept;
- operators no longer needed for that output are dropped, then tensors, buffers and operator
  codes nobody references any more are removed and the indices renumbered (so the file does
  not carry the tail's size vectors or dead opcodes); buffer 0 (the empty sentinel) stays;
- signature defs of the subgraph are pointed at the new output;
- byte vectors (buffers, custom options) are written 16-byte aligned, as TFLite's own writer
  does, because kernels and the Edge TPU delegate read them in place.

Cost: one object-API unpack and pack; the large vectors (weights, custom options) stay numpy
arrays, so no per-byte Python work happens and the rewrite is cheap enough to run at every
model load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from segd.tflite.model import TensorInfo, op_name, read_model, tensor_info

__all__ = ["TAIL_OPS", "StripResult", "find_tail", "pack_model", "strip_tail"]

#: Operators that only post-process logits and may be cut off the end of the graph.
TAIL_OPS = frozenset({"RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "ARG_MAX"})

_ALIGN = 16


@dataclass(frozen=True)
class StripResult:
    """The rewritten model and what was taken out of it."""

    model_bytes: bytes
    #: Names of the removed operators, in execution order (e.g. RESIZE_BILINEAR, ARG_MAX).
    removed_ops: list[str]
    #: The new (single) output: the logits tensor, described in the rewritten model.
    output: TensorInfo
    removed_tensors: int
    removed_buffers: int


class _AligningBuilder(flatbuffers.Builder):
    """A builder that writes byte vectors on 16-byte boundaries.

    The object API packs ``uint8`` vectors (buffer data, custom options) with alignment 1;
    TFLite's schema asks for ``force_align: 16`` on buffer data, and in-place readers (the
    interpreter's mmap, the Edge TPU delegate parsing its executable) rely on it.
    """

    def CreateNumpyVector(self, x: np.ndarray) -> int:
        if x.dtype != np.uint8 or x.ndim != 1:
            return int(super().CreateNumpyVector(x))
        payload = x.tobytes()
        self.StartVector(1, len(payload), _ALIGN)
        self.head = self.head - len(payload)  # type: ignore[has-type]
        self.Bytes[self.head : self.head + len(payload)] = payload
        self.vectorNumElems = len(payload)
        return int(self.EndVector())


def _producers(sg: schema.SubGraphT) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, op in enumerate(sg.operators or []):
        for t in op.outputs if op.outputs is not None else ():
            out[int(t)] = k
    return out


def find_tail(model: schema.ModelT) -> tuple[list[int], int]:
    """The trailing resize/argmax chain of subgraph 0: (op indices in order, logits tensor).

    Raises ValueError when the graph does not end in such a chain.
    """
    if not model.subgraphs:
        raise ValueError("model has no subgraph")
    sg = model.subgraphs[0]
    outputs = [int(i) for i in (sg.outputs if sg.outputs is not None else ())]
    if len(outputs) != 1:
        raise ValueError(f"expected a single graph output, found {len(outputs)}")
    producers = _producers(sg)
    chain: list[int] = []
    tensor = outputs[0]
    while tensor in producers:
        k = producers[tensor]
        op = sg.operators[k]
        if op_name(model, op.opcodeIndex) not in TAIL_OPS:
            break
        chain.insert(0, k)
        tensor = int(op.inputs[0])
    if not chain:
        last = producers.get(outputs[0])
        what = op_name(model, sg.operators[last].opcodeIndex) if last is not None else "no op"
        raise ValueError(
            "graph does not end in RESIZE_BILINEAR / RESIZE_NEAREST_NEIGHBOR / ARG_MAX "
            f"(its output comes from {what}); nothing to strip"
        )
    if tensor not in producers:
        raise ValueError("the whole graph is a resize/argmax chain; stripping it leaves nothing")
    return chain, tensor


def _live_ops(sg: schema.SubGraphT, outputs: list[int]) -> list[bool]:
    """Which operators are needed to compute ``outputs`` (walk back in execution order)."""
    needed = set(outputs)
    keep = [False] * len(sg.operators or [])
    for k in range(len(keep) - 1, -1, -1):
        op = sg.operators[k]
        outs = op.outputs if op.outputs is not None else ()
        if any(int(t) in needed for t in outs):
            keep[k] = True
            needed.update(int(t) for t in (op.inputs if op.inputs is not None else ()) if t >= 0)
            needed.update(
                int(t) for t in (op.intermediates if op.intermediates is not None else ())
            )
    return keep


def _remap(values: Any, mapping: dict[int, int]) -> list[int] | None:
    if values is None:
        return None
    return [mapping[int(v)] if int(v) >= 0 else int(v) for v in values]


def _compact_tensors(sg: schema.SubGraphT) -> tuple[dict[int, int], int]:
    used: set[int] = set()
    used.update(int(i) for i in (sg.inputs if sg.inputs is not None else ()))
    used.update(int(i) for i in (sg.outputs if sg.outputs is not None else ()))
    for op in sg.operators or []:
        for field in (op.inputs, op.outputs, op.intermediates):
            if field is not None:
                used.update(int(i) for i in field if int(i) >= 0)
    old = list(sg.tensors or [])
    mapping = {o: n for n, o in enumerate(sorted(used))}
    sg.tensors = [old[o] for o in sorted(used)]
    sg.inputs = _remap(sg.inputs, mapping)
    sg.outputs = _remap(sg.outputs, mapping)
    for op in sg.operators or []:
        op.inputs = _remap(op.inputs, mapping)
        op.outputs = _remap(op.outputs, mapping)
        op.intermediates = _remap(op.intermediates, mapping)
    return mapping, len(old) - len(used)


def _compact_buffers(model: schema.ModelT) -> int:
    used = {0}
    for sg in model.subgraphs or []:
        used.update(int(t.buffer) for t in sg.tensors or [])
    used.update(int(m.buffer) for m in model.metadata or [])
    used.update(int(b) for b in (model.metadataBuffer if model.metadataBuffer is not None else ()))
    old = list(model.buffers or [])
    mapping = {o: n for n, o in enumerate(sorted(used))}
    model.buffers = [old[o] for o in sorted(used)]
    for sg in model.subgraphs or []:
        for t in sg.tensors or []:
            t.buffer = mapping[int(t.buffer)]
    for m in model.metadata or []:
        m.buffer = mapping[int(m.buffer)]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [mapping[int(b)] for b in model.metadataBuffer]
    return len(old) - len(used)


def _compact_opcodes(model: schema.ModelT) -> None:
    used = sorted(
        {int(op.opcodeIndex) for sg in model.subgraphs or [] for op in sg.operators or []}
    )
    mapping = {o: n for n, o in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[o] for o in used]
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            op.opcodeIndex = mapping[int(op.opcodeIndex)]


def _retarget_signatures(model: schema.ModelT, new_output: int, tensor_map: dict[int, int]) -> None:
    for sig in model.signatureDefs or []:
        if int(sig.subgraphIndex or 0) != 0:
            continue
        for tm in sig.inputs or []:
            tm.tensorIndex = tensor_map[int(tm.tensorIndex)]
        outs = list(sig.outputs or [])
        key = outs[0].name if len(outs) == 1 else None
        entry = schema.TensorMapT()
        entry.name = key if key else model.subgraphs[0].tensors[new_output].name
        entry.tensorIndex = new_output
        sig.outputs = [entry]


def pack_model(model: schema.ModelT, size_hint: int = 1 << 20) -> bytes:
    """Serialize an object-API model to ``.tflite`` bytes (16-byte aligned byte vectors)."""
    builder = _AligningBuilder(size_hint + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def strip_tail(model_bytes: bytes) -> StripResult:
    """Remove the trailing RESIZE_*/ARG_MAX chain so the model outputs the logits feeding it.

    Raises ValueError if the model has no such tail, more than one output, or stores buffers
    outside the flatbuffer (models over 2 GB), which this rewrite cannot carry over.
    """
    model = read_model(model_bytes)
    if any(int(b.offset or 0) > 1 for b in model.buffers or []):
        raise ValueError("model keeps buffers outside the flatbuffer (>2 GB layout); not supported")
    _, logits = find_tail(model)
    sg = model.subgraphs[0]
    sg.outputs = [logits]

    keep = _live_ops(sg, [logits])
    removed = [
        op_name(model, op.opcodeIndex) for op, k in zip(sg.operators, keep, strict=True) if not k
    ]
    sg.operators = [op for op, k in zip(sg.operators, keep, strict=True) if k]

    tensor_map, removed_tensors = _compact_tensors(sg)
    new_logits = tensor_map[logits]
    _retarget_signatures(model, new_logits, tensor_map)
    removed_buffers = _compact_buffers(model)
    _compact_opcodes(model)

    out = pack_model(model, len(model_bytes))
    return StripResult(
        model_bytes=out,
        removed_ops=removed,
        output=tensor_info(model, new_logits),
        removed_tensors=removed_tensors,
        removed_buffers=removed_buffers,
    )
