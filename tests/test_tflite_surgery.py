"""Tail surgery and model reading on Coral's real DeepLab files (CPU and compiled Edge TPU)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from segd.tflite.model import (
    builtin_code,
    dequantize,
    find_tensor,
    list_ops,
    read_model,
    subgraph_outputs,
    tensor_data,
)
from segd.tflite.surgery import TAIL_OPS, strip_tail

CPU_MODELS = [
    ("deeplabv3_mnv2_pascal_quant", "bird_segmentation.bmp"),
    ("deeplabv3_mnv2_dm05_pascal_quant", "bird_segmentation.bmp"),
    ("deeplab_mobilenet_edgetpu_slim_cityscapes_quant", "cityscapes_segmentation.bmp"),
]
# What the compiled files keep on the CPU once the tail is gone (see coral-test-data README:
# the pascal files run the image-pooling resize and the decoder on the CPU, cityscapes only
# the final resize and argmax).
EDGETPU_REMAINING = {
    "deeplabv3_mnv2_pascal_quant": [
        "edgetpu-custom-op", "RESIZE_BILINEAR", "QUANTIZE", "CONCATENATION", "CONV_2D", "CONV_2D",
    ],
    "deeplabv3_mnv2_dm05_pascal_quant": [
        "edgetpu-custom-op", "RESIZE_BILINEAR", "QUANTIZE", "CONCATENATION", "CONV_2D", "CONV_2D",
    ],
    "deeplab_mobilenet_edgetpu_slim_cityscapes_quant": ["edgetpu-custom-op"],
}  # fmt: skip


def _rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[None]


def _run(model_bytes: bytes, x: np.ndarray, preserve: bool = False) -> Interpreter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = Interpreter(model_content=model_bytes, experimental_preserve_all_tensors=preserve)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return interp


@pytest.mark.parametrize(("name", "image"), CPU_MODELS)
def test_stripped_model_outputs_the_original_logits_bit_for_bit(
    test_data: Path, name: str, image: str
) -> None:
    original = (test_data / f"{name}.tflite").read_bytes()
    result = strip_tail(original)
    x = _rgb(test_data / image)

    full = _run(original, x, preserve=True)
    by_name = {d["name"]: d["index"] for d in full.get_tensor_details()}
    expected = full.get_tensor(by_name[result.output.name])

    stripped = _run(result.model_bytes, x)
    (out,) = stripped.get_output_details()
    got = stripped.get_tensor(out["index"])

    assert out["name"] == result.output.name
    assert got.dtype == np.uint8 and got.shape == expected.shape == result.output.shape
    assert np.array_equal(got, expected)
    assert np.ptp(got) > 0  # real logits, not a constant tensor
    scale, zero_point = out["quantization"]
    assert result.output.quantization is not None
    assert scale == pytest.approx(float(result.output.quantization.scale[0]))
    assert zero_point == int(result.output.quantization.zero_point[0])


@pytest.mark.parametrize(("name", "image"), CPU_MODELS)
def test_strip_removes_only_the_resize_argmax_tail(test_data: Path, name: str, image: str) -> None:
    original = (test_data / f"{name}.tflite").read_bytes()
    result = strip_tail(original)
    before = list_ops(read_model(original))
    after_model = read_model(result.model_bytes)
    after = list_ops(after_model)

    assert result.removed_ops == ["RESIZE_BILINEAR", "RESIZE_BILINEAR", "ARG_MAX"]
    assert [op.name for op in after] == [op.name for op in before[: len(after)]]
    assert [op.name for op in before[len(after) :]] == result.removed_ops
    # The new output is exactly what fed the first removed op, under its original name.
    assert result.output.name == before[len(after)].inputs[0].name
    assert [t.name for t in subgraph_outputs(after_model)] == [result.output.name]
    # Nothing dangling: every buffer and opcode left is referenced.
    used = {t.buffer for t in after_model.subgraphs[0].tensors} | {
        m.buffer for m in after_model.metadata or []
    }
    assert used | {0} == set(range(len(after_model.buffers)))
    assert {o.opcodeIndex for o in after_model.subgraphs[0].operators} == set(
        range(len(after_model.operatorCodes))
    )


@pytest.mark.parametrize("name", list(EDGETPU_REMAINING))
def test_stripped_edgetpu_model_keeps_the_custom_op_byte_for_byte(
    test_data: Path, name: str
) -> None:
    original = (test_data / f"{name}_edgetpu.tflite").read_bytes()
    result = strip_tail(original)
    before, after = read_model(original), read_model(result.model_bytes)

    assert [op.name for op in list_ops(after)] == EDGETPU_REMAINING[name]
    assert not set(result.removed_ops) - TAIL_OPS and result.removed_ops[-1] == "ARG_MAX"

    old_op, new_op = before.subgraphs[0].operators[0], after.subgraphs[0].operators[0]
    assert bytes(new_op.customOptions) == bytes(old_op.customOptions)
    assert len(new_op.customOptions) > 100_000  # the compiled executable, not an empty blob
    assert new_op.customOptionsFormat == old_op.customOptionsFormat
    old_info, new_info = list_ops(before)[0], list_ops(after)[0]
    assert [t.name for t in new_info.inputs] == [t.name for t in old_info.inputs]
    assert [t.name for t in new_info.outputs] == [t.name for t in old_info.outputs]
    assert [(t.shape, t.quantization.scale[0]) for t in new_info.outputs if t.quantization] == [
        (t.shape, t.quantization.scale[0]) for t in old_info.outputs if t.quantization
    ]
    # The graph now ends at the logits: 33x33 class scores, uint8.
    assert result.output.shape[1:3] == (33, 33) and result.output.type_name == "UINT8"


def _vector_start(table: flatbuffers.table.Table, slot: int) -> int | None:
    offset = table.Offset(slot)
    return int(table.Vector(offset)) if offset else None


@pytest.mark.parametrize("name", list(EDGETPU_REMAINING))
def test_stripped_model_keeps_byte_vectors_16_byte_aligned(test_data: Path, name: str) -> None:
    out = strip_tail((test_data / f"{name}_edgetpu.tflite").read_bytes()).model_bytes
    raw = schema.Model.GetRootAs(out, 0)
    op = raw.Subgraphs(0).Operators(0)
    starts = [_vector_start(op._tab, 14)]  # custom_options
    for i in range(raw.BuffersLength()):
        if raw.Buffers(i).DataLength():
            starts.append(_vector_start(raw.Buffers(i)._tab, 4))
    assert starts and all(s is not None and s % 16 == 0 for s in starts)


def test_strip_refuses_a_model_without_a_tail(test_data: Path) -> None:
    once = strip_tail((test_data / "deeplabv3_mnv2_dm05_pascal_quant.tflite").read_bytes())
    with pytest.raises(ValueError, match="nothing to strip"):
        strip_tail(once.model_bytes)


def test_strip_refuses_bytes_that_are_not_tflite(test_data: Path) -> None:
    with pytest.raises(ValueError, match="TFLite"):
        strip_tail((test_data / "bird.bmp").read_bytes())
    with pytest.raises(ValueError):
        strip_tail(b"")


def test_strip_cuts_nearest_and_argmax_only_tails() -> None:
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 5)).astype(np.float32))
    spec = [tf.TensorSpec([1, 16, 16, 3], tf.float32)]

    @tf.function(input_signature=spec)
    def nearest_then_argmax(x):  # type: ignore[no-untyped-def]
        logits = tf.nn.conv2d(x, kernel, 1, "SAME")
        return tf.argmax(tf.image.resize(logits, [32, 32], method="nearest"), axis=-1)

    @tf.function(input_signature=spec)
    def argmax_only(x):  # type: ignore[no-untyped-def]
        return tf.argmax(tf.nn.conv2d(x, kernel, 1, "SAME"), axis=-1)

    cases = [
        (nearest_then_argmax, ["RESIZE_NEAREST_NEIGHBOR", "ARG_MAX"]),
        (argmax_only, ["ARG_MAX"]),
    ]
    x = rng.random((1, 16, 16, 3), dtype=np.float32)
    for fn, tail in cases:
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
        tflite = conv.convert()
        result = strip_tail(tflite)
        assert result.removed_ops == tail
        full = _run(tflite, x, preserve=True)
        by_name = {d["name"]: d["index"] for d in full.get_tensor_details()}
        stripped = _run(result.model_bytes, x)
        got = stripped.get_tensor(stripped.get_output_details()[0]["index"])
        assert got.shape == (1, 16, 16, 5) and got.dtype == np.float32
        assert np.array_equal(got, full.get_tensor(by_name[result.output.name]))


def test_tensor_data_returns_the_weights_the_interpreter_uses(test_data: Path) -> None:
    data = (test_data / "deeplabv3_mnv2_dm05_pascal_quant.tflite").read_bytes()
    model = read_model(data)
    conv = next(op for op in list_ops(model) if op.name == "CONV_2D")
    weights, bias = conv.inputs[1], conv.inputs[2]
    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    assert np.array_equal(tensor_data(model, weights), interp.get_tensor(weights.index))
    assert np.array_equal(tensor_data(model, bias), interp.get_tensor(bias.index))
    assert tensor_data(model, bias).dtype == np.int32
    assert find_tensor(model, weights.name) == weights
    with pytest.raises(ValueError, match="computed at run time"):
        tensor_data(model, conv.outputs[0])


def test_dequantize_recovers_per_channel_int8_weights() -> None:
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    inp = tf.keras.Input((8, 8, 3), batch_size=1)
    layer = tf.keras.layers.Conv2D(6, 3, padding="same", use_bias=False)
    model = tf.keras.Model(inp, layer(inp))
    kernel = rng.normal(size=(3, 3, 3, 6)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)
    layer.set_weights([kernel])

    def rep():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield [rng.random((1, 8, 8, 3), dtype=np.float32)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    tfl = read_model(conv.convert())
    op = next(op for op in list_ops(tfl) if op.name == "CONV_2D")
    w = op.inputs[1]
    assert w.type_name == "INT8" and w.quantization is not None and w.quantization.per_channel
    real = dequantize(tensor_data(tfl, w), w.quantization)  # [out, h, w, in]
    expected = kernel.transpose(3, 0, 1, 2)
    step = w.quantization.scale.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(real - expected) <= step / 2 + 1e-6)
    # Per-tensor path: a uint8 activation's zero point maps back to exactly 0.0.
    q = list_ops(tfl)[0].outputs[0].quantization
    assert q is not None
    assert dequantize(np.array([q.zero_point[0]]), q)[0] == 0.0


def test_builtin_code_is_the_larger_of_the_two_schema_fields() -> None:
    old_writer = schema.OperatorCodeT()
    old_writer.deprecatedBuiltinCode, old_writer.builtinCode = 3, 0  # CONV_2D, pre-v3a file
    new_code = schema.OperatorCodeT()
    new_code.deprecatedBuiltinCode, new_code.builtinCode = 127, 150  # code > 127
    assert builtin_code(old_writer) == 3
    assert builtin_code(new_code) == 150


def test_tflite_tooling_imports_without_tensorflow() -> None:
    # segd loads this on a Raspberry Pi: neither the package nor its tooling may pull in TF.
    code = (
        "import sys, coral_deeplab, coral_deeplab.tflite\n"
        "bad = [m for m in sys.modules if m == 'tensorflow' or m.startswith(('tensorflow.', 'keras'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
