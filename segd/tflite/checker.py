"""Static Edge TPU op-mapping checker: which ops of a ``.tflite`` file the compiler will map.

``edgetpu_compiler`` is x86-only and closed; this predicts its decision from the flatbuffer
alone, so a model can be checked on a Pi or in CI. Each op gets ``supported`` (can the Edge
TPU run this op as configured?) and ``mapped`` (will it run there in a default compile?).

Sources (cited per rule below):

[DOC] Coral, "TensorFlow models on the Edge TPU" (coral.ai/docs/edgetpu/models-intro),
      "Model requirements" and the "Supported operations" table with its "Known limitations".
      Requirements quoted there: tensor parameters are quantized (8-bit fixed-point numbers,
      int8 or uint8); tensor sizes are constant at compile time (no dynamic sizes); model
      parameters (such as bias tensors) are constant at compile time; tensors are 1-, 2- or
      3-dimensional, and if a tensor has more than 3 dimensions only the 3 innermost may have a
      size greater than 1; the model uses only the operations in the table. The same page: the
      compiler cannot partition the model more than once, so as soon as an unsupported op
      occurs, that op and everything after it run on the CPU, even if supported ops follow.
      (Newer limitation wording, e.g. Conv2d "Must use the same dilation in x and y
      dimensions", Mean "If a z-reduction, the z-dimension must be multiple of 4", is also
      mirrored on Axis' ARTPEC-7 "Supported ops" page, a SoC with an Edge TPU.)
[I31]  google-coral/edgetpu#31: ResizeBilinear maps for small inputs only; maintainers: the
       compiler rejects the op "if loss of precision is higher than threshold" (undisclosed).
[I63]  google-coral/edgetpu#63: status "Image-interpolation layer won't run precisely enough
       on Edge TPU" for RESIZE_BILINEAR.
[I396] google-coral/edgetpu#396, #420, #114: RESIZE_* with half_pixel_centers (op version 3)
       reported "Operation version not supported" by compilers 14/15.
[I461] google-coral/edgetpu#461: with one subgraph (the default), ops after the first unmapped
       op report "More than one subgraph is not supported"; large MEAN ops may not map.
[TFV]  tensorflow/lite/tools/versioning/runtime_version.cc: the TFLite release that introduced
       each op version. Compiler 16.0.384591198 is from mid-2021 (TF 2.5 era); op versions
       first shipped later cannot be known to it.

Where the documentation gives only a vague limit (resize precision), ``supported`` is None
("uncertain") with the reason, and the guaranteed Edge TPU segment stops before that op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from segd.tflite.model import OpInfo, TensorInfo, list_ops, read_model, tensor_data

__all__ = ["SUPPORTED_OPS", "CheckReport", "OpRow", "check_model", "format_report"]

# A check returns None (no objection) or (verdict, reason): verdict False = not mapped,
# None = uncertain, True = explicitly fine (the reason is kept as a note).
Verdict = tuple[bool | None, str]
Check = Callable[[OpInfo, schema.ModelT], Verdict | None]

_EIGHT_BIT = frozenset({"UINT8", "INT8"})


@dataclass(frozen=True)
class OpRule:
    """What [DOC] says about one TFLite builtin, as executable checks."""

    limitation: str = ""
    checks: tuple[Check, ...] = ()
    #: Highest op version whose TFLite release predates compiler 16 ([TFV], TF <= 2.5).
    max_version: int | None = None


@dataclass(frozen=True)
class OpRow:
    index: int
    op: str
    version: int
    #: Can the Edge TPU run this op as configured (None: the documentation cannot tell).
    supported: bool | None
    #: Will it run on the Edge TPU in a default (single-segment) compile.
    mapped: bool | None
    reason: str


@dataclass(frozen=True)
class CheckReport:
    rows: list[OpRow]
    #: Index of the last op of the Edge TPU segment (ops 0..segment_end); -1: no op maps.
    segment_end: int
    #: Tensors leaving the segment (consumed by CPU ops or graph outputs), by name: what the
    #: compiled model's edgetpu-custom-op would output.
    segment_outputs: list[str]
    #: The op that ends the segment, if any, and whether it surely fails (False) or may map (None).
    stop_index: int | None
    stop_certain: bool

    @property
    def n_ops(self) -> int:
        return len(self.rows)

    @property
    def n_mapped(self) -> int:
        return sum(1 for r in self.rows if r.mapped is True)

    @property
    def fully_mapped(self) -> bool:
        return self.n_mapped == self.n_ops and self.n_ops > 0


# --- checks ------------------------------------------------------------------------------
def _opt(op: OpInfo, key: str, default: object = 0) -> object:
    return op.options.get(key, default)


def _no_fused_activation(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if _opt(op, "fusedActivationFunction", 0):
        return False, "fused activation function (DOC: 'No fused activation function')"
    return None


def _same_dilation(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if _opt(op, "dilationWFactor", 1) != _opt(op, "dilationHFactor", 1):
        return False, "different x/y dilation (DOC: 'Must use the same dilation in x and y')"
    return None


def _const_values(model: schema.ModelT, t: TensorInfo) -> np.ndarray | None:
    return tensor_data(model, t) if t.is_constant else None


def _concat_constant_inputs(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    consts = [t for t in op.inputs if t.is_constant]
    if not consts:
        return None
    values = _const_values(model, consts[0])
    if (
        len(op.inputs) != 2
        or len(consts) != 1
        or values is None
        or np.any(values != _zero(consts[0]))
    ):
        return False, (
            "constant input: DOC allows it only as one of exactly 2 inputs and all zeros "
            "(a zero-padding op)"
        )
    return None


def _zero(t: TensorInfo) -> int:
    """The stored value that means real 0 (the zero point for quantized tensors)."""
    return int(t.quantization.zero_point[0]) if t.quantization is not None else 0


def _non_unit_dims(shape: tuple[int, ...]) -> int:
    return sum(1 for d in shape if d != 1)


def _fully_connected(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if _opt(op, "weightsFormat", 0) != 0:
        return False, "non-default weights format (DOC: 'Only the default format is supported')"
    if op.outputs and _non_unit_dims(op.outputs[0].shape) > 1:
        return False, "output is not one-dimensional (DOC: 'Output tensor is one-dimensional')"
    return None


def _axes(op: OpInfo, model: schema.ModelT, position: int = 1) -> list[int] | None:
    if len(op.inputs) <= position:
        return None
    values = _const_values(model, op.inputs[position])
    if values is None:
        return None
    rank = len(op.inputs[0].shape)
    return [int(a) % rank if rank else int(a) for a in np.asarray(values).reshape(-1)]


def _no_batch_reduction(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    axes = _axes(op, model)
    if axes is None:
        return None  # the generic constant-parameter check reports non-constant axes
    if 0 in axes and len(op.inputs[0].shape) == 4:
        return False, "reduces the batch dimension (DOC: 'No reduction in batch dimension')"
    return None


def _mean(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    verdict = _no_batch_reduction(op, model)
    if verdict is not None:
        return verdict
    axes = _axes(op, model) or []
    shape = op.inputs[0].shape
    if shape and (len(shape) - 1) in axes and shape[-1] % 4 != 0:
        return False, (
            f"z-reduction over {shape[-1]} channels (DOC: 'If a z-reduction, the z-dimension "
            "must be multiple of 4')"
        )
    return None


def _pad(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if len(op.inputs) < 2:
        return None
    pads = _const_values(model, op.inputs[1])
    if pads is None:
        return None
    pads = np.asarray(pads).reshape(-1, 2)
    if len(op.inputs[0].shape) == 4 and np.any(pads[0] != 0):
        return False, "pads the batch dimension (DOC: 'No padding in batch dimension')"
    return None


def _pack(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if _opt(op, "axis", 0) == 0:
        return False, "packs along the batch dimension (DOC: 'No packing in batch dimension')"
    return None


def _split(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    position = 0 if op.name == "SPLIT" else 2
    if len(op.inputs) <= position:
        return None
    axis = _const_values(model, op.inputs[position])
    data = op.inputs[1] if op.name == "SPLIT" else op.inputs[0]
    if (
        axis is not None
        and len(data.shape) == 4
        and int(np.asarray(axis).reshape(-1)[0]) % len(data.shape) == 0
    ):
        return False, "splits the batch dimension (DOC: 'No splitting in batch dimension')"
    return None


def _prelu(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if len(op.inputs) > 1 and _non_unit_dims(op.inputs[1].shape[:-1]) > 0:
        return False, "alpha is not 1-dimensional (DOC: 'Alpha must be 1-dimensional')"
    return None


def _softmax(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    shape = op.inputs[0].shape
    if _non_unit_dims(shape) > 1 or int(np.prod(shape or (1,))) > 16000:
        return False, "input is not 1-D with <= 16,000 elements (DOC limitation of Softmax)"
    return None


def _squeeze(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    shape = op.inputs[0].shape
    raw = op.options.get("squeezeDims")
    dims = [int(d) for d in raw] if raw is not None else []
    squeezed = (
        {d % len(shape) for d in dims} if dims else {i for i, d in enumerate(shape) if d == 1}
    )
    leading = 0
    while leading < len(shape) and shape[leading] == 1:
        leading += 1
    if any(d >= leading for d in squeezed):
        return False, "squeezes a non-leading 1 (DOC: only leading 1s, no relayout)"
    return None


def _strided_slice(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if _opt(op, "ellipsisMask", 0) or _opt(op, "newAxisMask", 0):
        return False, "ellipsis/new-axis mask set (DOC: both must be 0)"
    if len(op.inputs) > 3:
        strides = _const_values(model, op.inputs[3])
        if strides is not None and np.any(np.asarray(strides) != 1):
            return False, "a stride is not 1 (DOC: 'all strides are equal to 1')"
    return None


def _resize(op: OpInfo, model: schema.ModelT) -> Verdict | None:
    if _opt(op, "halfPixelCenters", False):
        return None, (
            "half_pixel_centers (op version 3): 'Operation version not supported' in "
            "compilers 14/15 (I396); not documented for 16"
        )
    src, dst = op.inputs[0].shape, op.outputs[0].shape
    if len(src) == 4 and len(dst) == 4 and src[1:3] == dst[1:3]:
        return True, "identity resize (no interpolation, so no precision to lose)"
    return None, (
        f"{src[1]}x{src[2]} -> {dst[1]}x{dst[2]}: DOC 'depending on input/output size ... "
        "might not be mapped to avoid loss in precision'; threshold undisclosed (I31, I63)"
    )


# --- the table ---------------------------------------------------------------------------
_NO_ACT = (_no_fused_activation,)

#: TFLite builtin -> rule, from [DOC]'s supported-operations table. max_version from [TFV].
SUPPORTED_OPS: dict[str, OpRule] = {
    "ADD": OpRule(max_version=3),
    "AVERAGE_POOL_2D": OpRule("No fused activation function.", _NO_ACT, 3),
    "CONCATENATION": OpRule(
        "No fused activation; a constant input only as 2-input all-zeros padding.",
        (_no_fused_activation, _concat_constant_inputs),
        3,
    ),
    "CONV_2D": OpRule("Same dilation in x and y.", (_same_dilation,), 5),
    "DEPTHWISE_CONV_2D": OpRule("Same dilation in x and y.", (_same_dilation,), 6),
    "EXPAND_DIMS": OpRule(max_version=1),
    "FULLY_CONNECTED": OpRule(
        "Default weights format; output one-dimensional.", (_fully_connected,), 9
    ),
    "L2_NORMALIZATION": OpRule(max_version=2),
    "LOGISTIC": OpRule(max_version=3),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": OpRule("Unidirectional LSTM only.", (), 3),
    "MAXIMUM": OpRule(max_version=4),
    "MAX_POOL_2D": OpRule("No fused activation function.", _NO_ACT, 3),
    "MEAN": OpRule("No batch reduction; z-reduction needs z % 4 == 0.", (_mean,), 3),
    "MINIMUM": OpRule(max_version=4),
    "MUL": OpRule(max_version=4),
    "PACK": OpRule("No packing in batch dimension.", (_pack,), 3),
    "PAD": OpRule("No padding in batch dimension.", (_pad,), 3),
    "PRELU": OpRule("Alpha 1-dimensional.", (_prelu,), 1),
    "QUANTIZE": OpRule(max_version=2),
    "REDUCE_MAX": OpRule("Not on the batch dimension.", (_no_batch_reduction,), 3),
    "REDUCE_MIN": OpRule("Not on the batch dimension.", (_no_batch_reduction,), 3),
    "RELU": OpRule(max_version=3),
    "RELU6": OpRule(max_version=3),
    "RELU_N1_TO_1": OpRule(max_version=1),
    "RESHAPE": OpRule("Certain reshapes might not be mapped for large tensor sizes.", (), 1),
    "RESIZE_BILINEAR": OpRule("3-D; size-dependent precision limit.", (_resize,), 4),
    "RESIZE_NEAREST_NEIGHBOR": OpRule("3-D; size-dependent precision limit.", (_resize,), 4),
    "RSQRT": OpRule(max_version=2),
    "SLICE": OpRule(max_version=5),
    "SOFTMAX": OpRule("1-D input, at most 16,000 elements.", (_softmax,), 3),
    "SPACE_TO_DEPTH": OpRule(max_version=2),
    "SPLIT": OpRule("No splitting in batch dimension.", (_split,), 4),
    "SPLIT_V": OpRule("No splitting in batch dimension.", (_split,), 2),
    "SQUARED_DIFFERENCE": OpRule(max_version=2),
    "SQUEEZE": OpRule("Only leading 1s (no relayout).", (_squeeze,), 2),
    "STRIDED_SLICE": OpRule("Strides 1, no ellipsis/new-axis mask.", (_strided_slice,), 5),
    "SUB": OpRule(max_version=5),
    "SUM": OpRule("Not on the batch dimension.", (_no_batch_reduction,), 2),
    "TANH": OpRule(max_version=3),
    # TILE is absent from the table versions we could read, but Google's own compiled
    # EdgeTPU-DeepLab-slim (Coral test data) runs its 1x1 -> 33x33 TILE inside the
    # edgetpu-custom-op: the compiler maps it. Version 3 (TF 2.8) postdates compiler 16.
    "TILE": OpRule("Not in the documented table; mapped in Google's compiled models.", (), 2),
    "TRANSPOSE": OpRule(max_version=5),
    "TRANSPOSE_CONV": OpRule(max_version=3),
}


# --- generic requirements ----------------------------------------------------------------
def _requirements(op: OpInfo) -> Verdict | None:
    """[DOC] "Model requirements", applied to the op's tensors."""
    for t in (*op.inputs, *op.outputs):
        if t.is_dynamic:
            return False, f"tensor {t.name!r} has a dynamic size {t.shape_signature}"
    for t in op.inputs:
        if t.is_constant:
            if t.type_name in _EIGHT_BIT and t.quantization is None:
                return False, f"parameter {t.name!r} is not quantized"
            if t.type_name not in _EIGHT_BIT | {"INT32", "INT64"}:
                return False, f"parameter {t.name!r} is {t.type_name}, not 8-bit fixed point"
        elif t.type_name not in _EIGHT_BIT or t.quantization is None:
            what = "is not quantized" if t.type_name in _EIGHT_BIT else f"is {t.type_name}"
            if t.type_name in ("INT32", "INT64"):
                return False, f"parameter {t.name!r} is computed at run time, not constant"
            return False, f"input {t.name!r} {what}: the Edge TPU needs 8-bit quantized tensors"
    for t in op.outputs:
        if t.type_name not in _EIGHT_BIT or t.quantization is None:
            return False, f"output {t.name!r} is {t.type_name}: the Edge TPU needs 8-bit tensors"
    for t in (*op.inputs, *op.outputs):
        if not t.is_constant and len(t.shape) > 3 and any(d != 1 for d in t.shape[:-3]):
            return False, (
                f"tensor {t.name!r} {list(t.shape)} has a non-unit dimension outside the "
                "3 innermost"
            )
    return None


def _op_support(op: OpInfo, model: schema.ModelT) -> Verdict:
    rule = SUPPORTED_OPS.get(op.name)
    if rule is None:
        kind = "custom op" if op.is_custom else "op"
        return False, f"{kind} {op.name} is not in the Edge TPU's supported operations"
    verdict = _requirements(op)
    if verdict is not None:
        return verdict
    if rule.max_version is not None and op.version > rule.max_version:
        return None, (
            f"op version {op.version} postdates compiler 16 (newest known: {rule.max_version}); "
            "expect 'Operation version not supported'"
        )
    notes: list[str] = []
    uncertain: str | None = None
    for check in rule.checks:
        result = check(op, model)
        if result is None:
            continue
        ok, why = result
        if ok is False:
            return False, why
        if ok is None and uncertain is None:
            uncertain = why
        elif ok:
            notes.append(why)
    if uncertain is not None:
        return None, uncertain
    return True, "; ".join(notes) or (rule.limitation or "supported")


def _segment_outputs(ops: list[OpInfo], end: int, graph_outputs: set[int]) -> list[str]:
    produced: dict[int, str] = {}
    for op in ops[: end + 1]:
        for t in op.outputs:
            produced[t.index] = t.name
    used_after = {t.index for op in ops[end + 1 :] for t in op.inputs}
    return [name for i, name in produced.items() if i in used_after or i in graph_outputs]


def check_model(model_bytes: bytes) -> CheckReport:
    """Predict the default ``edgetpu_compiler`` partition of subgraph 0 of a ``.tflite`` model."""
    model = read_model(model_bytes)
    ops = list_ops(model)
    rows: list[OpRow] = []
    state: bool | None = True
    stop: int | None = None
    stop_certain = False
    for op in ops:
        supported, why = _op_support(op, model)
        if state is True:
            mapped, reason = supported, why
            if supported is not True:
                stop, stop_certain = op.index, supported is False
        elif state is None:
            mapped = False if supported is False else None
            reason = f"after uncertain op {stop}; " + why if supported is not False else why
        else:
            mapped = False
            reason = (
                f"after op {stop}, the compiler makes one Edge TPU subgraph ('More than one "
                "subgraph is not supported')"
                if supported is not False
                else why
            )
        if state is True:
            state = supported
        elif state is None and supported is False:
            state = False
        rows.append(OpRow(op.index, op.name, op.version, supported, mapped, reason))
    end = (stop if stop is not None else len(ops)) - 1
    sg = model.subgraphs[0]
    outs = {int(i) for i in (sg.outputs if sg.outputs is not None else ())}
    return CheckReport(
        rows=rows,
        segment_end=end,
        segment_outputs=_segment_outputs(ops, end, outs) if end >= 0 else [],
        stop_index=stop,
        stop_certain=stop_certain,
    )


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "?"}[value]


def format_report(report: CheckReport) -> str:
    """A plain-text table (index, op, mapped, reason) and a summary line."""
    width = max([len(r.op) for r in report.rows] + [2])
    lines = [f"{'#':>4}  {'op':<{width}}  {'mapped':<6}  reason"]
    for r in report.rows:
        lines.append(f"{r.index:>4}  {r.op:<{width}}  {_mark(r.mapped):<6}  {r.reason}")
    lines.append("")
    pct = 100.0 * report.n_mapped / report.n_ops if report.n_ops else 0.0
    lines.append(f"{report.n_mapped}/{report.n_ops} ops mapped to the Edge TPU ({pct:.0f}%)")
    if report.segment_end >= 0:
        lines.append(f"Edge TPU segment: ops 0..{report.segment_end}")
        lines.append("segment outputs: " + ", ".join(report.segment_outputs))
    else:
        lines.append("Edge TPU segment: none (the first op does not map)")
    if report.stop_index is not None:
        how = "does not map" if report.stop_certain else "may not map (uncertain)"
        lines.append(
            f"op {report.stop_index} ({report.rows[report.stop_index].op}) {how}; "
            "everything from there runs on the CPU"
        )
    return "\n".join(lines)
