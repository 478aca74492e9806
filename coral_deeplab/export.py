"""Full-integer TFLite export of coral_deeplab models, in the form the Edge TPU wants.

The exported file takes raw RGB bytes like Google's Coral models: uint8 input quantized with
scale exactly 1/128 and zero point 128, i.e. the float the keras model sees is
``(pixel - 128) / 128``. Internals are int8 (the only full-integer mode of the TF2 converter);
the output is the int8 logits tensor itself, so no trailing QUANTIZE op is added — the only
QUANTIZE is the uint8 -> int8 one on the input (same scale, zero point shifted by 128), which
the Edge TPU runs. The batch dimension is fixed to 1 (the compiler refuses dynamic shapes).

How the input scale is pinned: the converter derives the input quantization from the
calibration range of the input tensor. Real images rarely span exactly [-1, 127/128], so each
calibration image gets one pixel set to 0 and one to 255 (a negligible change for every other
tensor's range); int8 quantization of [-1, 127/128] is then exactly scale 1/128, zero point 0,
and the uint8 input becomes scale 1/128, zero point 128. :func:`to_tflite` verifies this and
raises if the converter ever does otherwise.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segd.dataset import IMAGE_SUFFIXES
from segd.errors import SegdError
from segd.settings import DEFAULT_MAX_PIXELS

__all__ = [
    "IMAGE_SUFFIXES",
    "INPUT_SCALE",
    "INPUT_ZERO_POINT",
    "ExportError",
    "calibration_batches",
    "export_problems",
    "input_quantization",
    "load_calibration_images",
    "op_histogram",
    "op_list",
    "to_tflite",
]

INPUT_SCALE = 1.0 / 128.0
INPUT_ZERO_POINT = 128
#: Decoder pixel limit for calibration files (segd eval's default for dataset images).
MAX_CALIBRATION_PIXELS = DEFAULT_MAX_PIXELS


class ExportError(SegdError, RuntimeError):
    """The converter produced something the Edge TPU path cannot use."""

    code = "export_failed"


def load_calibration_images(
    source: str | os.PathLike[str] | Iterable[np.ndarray],
) -> Iterator[np.ndarray]:
    """Yield HxWx3 uint8 RGB arrays from a directory of image files or an iterable of arrays.

    Files are decoded by segd's own decoder (:func:`segd.preprocess.decode_image`: EXIF
    orientation, alpha composited, 16-bit scaled) so the int8 ranges are measured on the pixels
    the daemon will feed the model.
    """
    if isinstance(source, (str, os.PathLike)):
        from segd.errors import SegdError
        from segd.preprocess import decode_image

        directory = Path(source)
        if not directory.is_dir():
            raise ValueError(f"calibration source {directory} is not a directory")
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
        for path in files:
            try:
                yield decode_image(path.read_bytes(), max_pixels=MAX_CALIBRATION_PIXELS).rgb
            except (OSError, SegdError) as exc:
                detail = exc.detail if isinstance(exc, SegdError) else exc.strerror
                raise ValueError(f"cannot decode calibration image {path}: {detail}") from exc
        return
    for i, image in enumerate(source):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"calibration image {i}: expected HxWx3 uint8 RGB, got {arr.dtype} {arr.shape}"
            )
        yield arr


def calibration_batches(
    images: Iterable[np.ndarray], size: tuple[int, int], limit: int
) -> list[np.ndarray]:
    """Stretch to ``size`` = (h, w) as segd serves, pin the range, normalize to float.

    The resize is segd's (:func:`segd.preprocess.fit_to_input` without ``keep_aspect``: area
    averaging when shrinking, bilinear when enlarging), so calibration sees the model inputs
    the daemon produces. Returns up to ``limit`` arrays of shape (1, h, w, 3), float32
    ``(pixel - 128) / 128``, each with one pixel at 0 and one at 255 so the input range is
    exactly [-1, 127/128].
    """
    from segd.preprocess import fit_to_input

    batches: list[np.ndarray] = []
    for image in images:
        if len(batches) >= limit:
            break
        image = np.array(fit_to_input(image, size, keep_aspect=False)[0], copy=True)
        image[0, 0, 0] = 0
        image[0, 0, 1] = 255
        x = (image.astype(np.float32) - INPUT_ZERO_POINT) * np.float32(INPUT_SCALE)
        batches.append(x[None])
    if not batches:
        raise ValueError("no calibration images")
    return batches


def to_tflite(
    model: Any,
    calibration_images: str | os.PathLike[str] | Iterable[np.ndarray],
    *,
    num_calibration: int = 32,
    output_path: str | os.PathLike[str] | None = None,
) -> bytes:
    """Convert a coral_deeplab keras model to a full-integer ``.tflite`` for the Edge TPU.

    Args:
        model: a tf_keras model taking float ``(pixel - 128) / 128`` input (H, W, 3).
        calibration_images: a directory of images or an iterable of HxWx3 uint8 RGB arrays;
            real images — the activation ranges (and so the int8 accuracy) come from them.
            Each is decoded and stretched to the model input size as segd does when serving.
        num_calibration: at most this many images are used (conversion time grows with it).
        output_path: also write the bytes there (atomically).

    Returns the flatbuffer: uint8 input (scale 1/128, zero point 128), int8 logits output,
    static batch 1. Raises ExportError when :func:`export_problems` finds anything.
    """
    import tensorflow as tf

    if num_calibration < 1:
        raise ValueError("num_calibration must be >= 1")
    _, height, width, channels = model.input_shape
    if channels != 3:
        raise ValueError(f"model input must be (H, W, 3), got {model.input_shape}")
    batches = calibration_batches(
        load_calibration_images(calibration_images), (int(height), int(width)), num_calibration
    )

    def representative() -> Iterator[list[np.ndarray]]:
        for batch in batches:
            yield [batch]

    # Trace with a static batch of 1: a keras model's batch dimension is None, which lands in
    # the file as shape_signature -1 — a dynamic size the Edge TPU compiler refuses.
    spec = tf.TensorSpec([1, int(height), int(width), 3], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.int8
    data = bytes(converter.convert())

    problems = export_problems(data)
    if problems:
        raise ExportError("the converted model is not Edge-TPU clean: " + "; ".join(problems))
    if output_path is not None:
        from segd.fsutil import atomic_write

        atomic_write(output_path, data)
    return data


def export_problems(tflite_bytes: bytes) -> list[str]:
    """What keeps a converted file from being the Edge-TPU-clean form ``to_tflite`` promises.

    Checks the input quantization (uint8, 1/128, 128), static shapes, no float tensors between
    ops (DEQUANTIZE or float islands run on the CPU) and no SPACE_TO_BATCH_ND /
    BATCH_TO_SPACE_ND (an unfused dilated convolution).
    """
    from segd.tflite.model import list_ops, read_model

    problems = []
    scale, zero_point, dtype = input_quantization(tflite_bytes)
    if dtype != "uint8" or scale != INPUT_SCALE or zero_point != INPUT_ZERO_POINT:
        problems.append(
            f"input is {dtype} scale {scale} zero point {zero_point}, expected uint8 "
            f"scale {INPUT_SCALE} zero point {INPUT_ZERO_POINT}"
        )
    ops = list_ops(read_model(tflite_bytes))
    counts = Counter(op.name for op in ops)
    for name in ("SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND", "DEQUANTIZE"):
        if counts[name]:
            problems.append(f"{counts[name]} {name} op(s)")
    for op in ops:
        for tensor in (*op.inputs, *op.outputs):
            if tensor.is_dynamic:
                problems.append(f"tensor {tensor.name!r} has a dynamic shape")
            if not tensor.is_constant and tensor.type_name == "FLOAT32":
                problems.append(f"tensor {tensor.name!r} is float32")
    return list(dict.fromkeys(problems))


def op_list(tflite_bytes: bytes) -> list[str]:
    """Op names of the main subgraph in execution order (custom ops by their custom code)."""
    from segd.tflite.model import list_ops, read_model

    return [op.name for op in list_ops(read_model(tflite_bytes))]


def op_histogram(tflite_bytes: bytes) -> dict[str, int]:
    """``{op name: count}`` of the main subgraph, most frequent first."""
    return dict(Counter(op_list(tflite_bytes)).most_common())


def input_quantization(tflite_bytes: bytes) -> tuple[float, int, str]:
    """(scale, zero point, dtype name in lower case) of the first input tensor."""
    from segd.tflite.model import read_model, subgraph_inputs

    tensor = subgraph_inputs(read_model(tflite_bytes))[0]
    q = tensor.quantization
    scale = float(q.scale[0]) if q is not None else 0.0
    zero = int(q.zero_point[0]) if q is not None else 0
    return scale, zero, tensor.type_name.lower()
