"""The static Edge TPU checker against what Google's compiler actually did to its own models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segd.tflite.checker import check_model, format_report
from segd.tflite.model import list_ops, read_model

GOOGLE_MODELS = [
    "deeplabv3_mnv2_pascal_quant",
    "deeplabv3_mnv2_dm05_pascal_quant",
    "deeplab_mobilenet_edgetpu_slim_cityscapes_quant",
]


def _compiled_truth(path: Path) -> tuple[set[str], list[str]]:
    """What the compiler did, read off its output file: the tensors leaving the
    edgetpu-custom-op, and the ops it left on the CPU (everything but the custom op)."""
    ops = list_ops(read_model(path.read_bytes()))
    (custom,) = [op for op in ops if op.name == "edgetpu-custom-op"]
    assert custom.index == 0
    return {t.name for t in custom.outputs}, [op.name for op in ops[1:]]


@pytest.mark.parametrize("name", GOOGLE_MODELS)
def test_checker_predicts_the_cut_of_googles_compiled_model(test_data: Path, name: str) -> None:
    cpu = (test_data / f"{name}.tflite").read_bytes()
    tpu_outputs, cpu_ops = _compiled_truth(test_data / f"{name}_edgetpu.tflite")
    report = check_model(cpu)
    original = list_ops(read_model(cpu))

    # The compiled file keeps the ops after the TPU segment, unchanged and in order.
    assert [op.name for op in original[report.segment_end + 1 :]] == cpu_ops
    assert set(report.segment_outputs) == tpu_outputs
    assert all(r.mapped is True for r in report.rows[: report.segment_end + 1])
    assert all(r.mapped is not True for r in report.rows[report.segment_end + 1 :])
    assert report.stop_index == report.segment_end + 1


def test_pascal_cut_is_the_image_pooling_resize_and_cityscapes_keeps_its_identity_resize(
    test_data: Path,
) -> None:
    pascal = check_model((test_data / "deeplabv3_mnv2_pascal_quant.tflite").read_bytes())
    stop = pascal.rows[pascal.stop_index or 0]
    assert stop.op == "RESIZE_BILINEAR" and stop.supported is None and "1x1 -> 33x33" in stop.reason
    assert pascal.rows[-1].op == "ARG_MAX" and pascal.rows[-1].mapped is False

    city = check_model(
        (test_data / "deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite").read_bytes()
    )
    resizes = [r for r in city.rows if r.op == "RESIZE_BILINEAR"]
    assert [r.mapped for r in resizes] == [True, None]
    assert "identity" in resizes[0].reason and "33x33 -> 513x513" in resizes[1].reason
    assert any(r.op == "TILE" and r.mapped for r in city.rows)


def test_a_compiled_model_is_not_mapped_again(test_data: Path) -> None:
    report = check_model((test_data / "deeplabv3_mnv2_pascal_quant_edgetpu.tflite").read_bytes())
    assert report.rows[0].op == "edgetpu-custom-op" and report.rows[0].mapped is False
    assert report.segment_end == -1 and report.n_mapped == 0
    assert "custom op" in report.rows[0].reason


# --- small models built with TensorFlow (tests only) --------------------------------------
def _convert(tf: Any, model: Any, *, int8: bool = True) -> bytes:
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)
        shape = [1 if d is None else d for d in model.input_shape]

        def rep():  # type: ignore[no-untyped-def]
            for _ in range(4):
                yield [rng.random(shape, dtype=np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
    return bytes(conv.convert())


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def _conv_relu(tf: Any, batch_size: int | None = 1) -> Any:
    inp = tf.keras.Input((32, 32, 3), batch_size=batch_size)
    x = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    return tf.keras.Model(inp, x)


def test_full_int8_conv_relu_model_maps_completely(tf: Any) -> None:
    report = check_model(_convert(tf, _conv_relu(tf)))
    assert report.fully_mapped, format_report(report)
    assert report.stop_index is None and report.segment_end == report.n_ops - 1
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "QUANTIZE"} <= {r.op for r in report.rows}
    text = format_report(report)
    assert f"{report.n_ops}/{report.n_ops} ops mapped" in text and "(100%)" in text


def test_float_model_is_not_mapped(tf: Any) -> None:
    report = check_model(_convert(tf, _conv_relu(tf), int8=False))
    assert report.n_mapped == 0 and report.stop_index == 0 and report.stop_certain
    assert "FLOAT32" in report.rows[0].reason


def test_dynamic_batch_is_not_mapped(tf: Any) -> None:
    report = check_model(_convert(tf, _conv_relu(tf, batch_size=None)))
    assert report.n_mapped == 0 and report.rows[0].mapped is False
    assert "dynamic size" in report.rows[0].reason


def test_unsupported_op_ends_the_single_segment(tf: Any) -> None:
    inp = tf.keras.Input((16, 16, 3), batch_size=1)
    x = tf.keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = tf.keras.layers.LeakyReLU(0.1)(x)
    x = tf.keras.layers.Conv2D(8, 3, padding="same")(x)
    report = check_model(_convert(tf, tf.keras.Model(inp, x)))
    names = [r.op for r in report.rows]
    leaky = names.index("LEAKY_RELU")
    assert report.stop_index == leaky and report.stop_certain
    assert report.segment_end == leaky - 1
    after = report.rows[leaky + 1]
    assert after.op == "CONV_2D" and after.supported is True and after.mapped is False
    assert "More than one subgraph" in after.reason


def test_resize_rules_distinguish_identity_upsample_and_half_pixel(tf: Any) -> None:
    inp = tf.keras.Input((8, 8, 4), batch_size=1)
    same = tf.keras.layers.Lambda(
        lambda t: tf.compat.v1.image.resize_bilinear(t, (8, 8), align_corners=True)
    )(inp)
    up = tf.keras.layers.Lambda(
        lambda t: tf.compat.v1.image.resize_bilinear(t, (16, 16), align_corners=True)
    )(same)
    half = tf.keras.layers.UpSampling2D(2, interpolation="bilinear")(up)  # half_pixel_centers
    report = check_model(_convert(tf, tf.keras.Model(inp, half)))
    resizes = [r for r in report.rows if r.op == "RESIZE_BILINEAR"]
    assert [r.supported for r in resizes] == [True, None, None]
    assert "identity" in resizes[0].reason
    assert "8x8 -> 16x16" in resizes[1].reason
    assert "half_pixel_centers" in resizes[2].reason


def test_format_report_lists_every_op_and_the_segment(test_data: Path) -> None:
    report = check_model((test_data / "deeplabv3_mnv2_dm05_pascal_quant.tflite").read_bytes())
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].split() == ["#", "op", "mapped", "reason"]
    assert len([ln for ln in lines[1:] if ln[:4].strip().isdigit()]) == report.n_ops
    assert f"{report.n_mapped}/{report.n_ops} ops mapped" in text
    assert f"Edge TPU segment: ops 0..{report.segment_end}" in text
