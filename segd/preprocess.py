"""Decoded RGB -> model input tensor. Pure functions: arrays in, arrays out, no I/O.

Order of work for one request: :func:`segd.image.header.probe_image` reads the header without
decoding (once per request), :func:`segd.image.decode.decode_image` decodes (in the daemon, in a
worker process), then here :func:`fit_to_input` resizes (stretch, or keep aspect and pad) to the
model input size and :func:`input_lut` + :func:`quantize` map pixel bytes to the input tensor
with one lookup table.

The probe and decode names are re-exported here: callers that prepare images import one module.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from segd.errors import BadParameter
from segd.image.decode import (
    ALPHA_BACKGROUND,
    DecodedImage,
    apply_orientation,
    check_limits,
    choose_reduce,
    decode_image,
    decoded_hw,
    quiet_codec_warnings,
    request_bytes,
)
from segd.image.header import PNG_MAX_METADATA_CHUNKS, ImageHeader, probe_image

__all__ = [
    "ALPHA_BACKGROUND",
    "PAD_VALUE",
    "PNG_MAX_METADATA_CHUNKS",
    "DecodedImage",
    "ImageHeader",
    "apply_orientation",
    "check_limits",
    "choose_reduce",
    "decode_image",
    "decoded_hw",
    "fit_to_input",
    "input_lut",
    "probe_image",
    "quantize",
    "quiet_codec_warnings",
    "request_bytes",
]

PAD_VALUE = 128
"""Grey used to pad letterboxed input. Raw-byte models (mean = std = 128, like Coral's DeepLab)
see it as 0.0, the dataset mean; black (0) would be -1.0, a strong dark edge the network never
saw in training. The TF DeepLab reference pipeline pads with the mean pixel (127.5) as well."""


# ----------------------------------------------------------------------------------------------
# Resizing to the model input
# ----------------------------------------------------------------------------------------------
def _check_rgb(rgb: np.ndarray, name: str = "rgb") -> None:
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.dtype != np.uint8
        or rgb.ndim != 3
        or rgb.shape[2] != 3
    ):
        raise BadParameter(f"{name} must be an H x W x 3 uint8 array")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadParameter(f"{name} has a zero dimension {rgb.shape[:2]}")


def _resize(rgb: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """INTER_AREA where shrinking (averages, no aliasing), INTER_LINEAR where enlarging; an
    image that shrinks on one axis and grows on the other is resized one axis at a time."""
    h, w = rgb.shape[:2]
    if (h, w) == (out_h, out_w):
        return rgb
    if out_h <= h and out_w <= w:
        return cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)
    if out_h >= h and out_w >= w:
        return cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    if out_h < h:  # shrink rows first (less data), then widen
        tmp = cv2.resize(rgb, (w, out_h), interpolation=cv2.INTER_AREA)
        return cv2.resize(tmp, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    tmp = cv2.resize(rgb, (out_w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(tmp, (out_w, out_h), interpolation=cv2.INTER_LINEAR)


def fit_to_input(
    rgb: np.ndarray, input_hw: tuple[int, int], keep_aspect: bool
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize RGB uint8 to the model input size.

    Returns ``(image, (top, left, height, width))`` where the box is the region of the input
    holding image content. ``keep_aspect=False`` stretches to the full input (box = the whole
    input). ``keep_aspect=True`` scales to fit and places the image at the TOP-LEFT corner,
    padding right/bottom with :data:`PAD_VALUE`: this is how the TF DeepLab reference pipeline
    (pad_to_bounding_box at offset 0,0) and pycoral's ``set_resized_input`` lay out the input,
    and it makes mapping the output back a plain crop. An image already at the input size is
    returned as is (same object, no copy).
    """
    _check_rgb(rgb)
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    if in_h < 1 or in_w < 1:
        raise BadParameter(f"input size must be positive, not {input_hw}")
    h, w = rgb.shape[:2]
    if (h, w) == (in_h, in_w):
        return rgb, (0, 0, in_h, in_w)
    if not keep_aspect:
        return np.ascontiguousarray(_resize(rgb, in_h, in_w)), (0, 0, in_h, in_w)
    scale = min(in_h / h, in_w / w)
    new_h = min(in_h, max(1, round(h * scale)))
    new_w = min(in_w, max(1, round(w * scale)))
    resized = _resize(rgb, new_h, new_w)
    if (new_h, new_w) == (in_h, in_w):
        return np.ascontiguousarray(resized), (0, 0, in_h, in_w)
    out = np.full((in_h, in_w, 3), PAD_VALUE, dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out, (0, 0, new_h, new_w)


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------
def _round_half_away(x: np.ndarray) -> np.ndarray:
    """std::round (TFLite's TfLiteRound): halves go away from zero (np.round would go to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def input_lut(
    mean: tuple[float, float, float] | np.ndarray,
    std: tuple[float, float, float] | np.ndarray,
    scale: float,
    zero_point: int,
    dtype: np.dtype | type | str,
) -> np.ndarray | None:
    """Per-channel table pixel byte -> input tensor value, shape (3, 256), or None for identity.

    The network expects ``f = (p - mean) / std``; a quantized input tensor holds
    ``q = clip(round(f / scale) + zero_point)`` with round = half away from zero, which is what
    TFLite's QUANTIZE op does (``TfLiteRound`` = ``std::round``). Computed in float64.
    For a float32 tensor the table holds ``f`` itself (scale/zero_point are ignored) and is
    never None. For uint8 tensors where ``q == p`` for every byte (Coral's models: mean = std =
    128, scale = 1/128, zero_point = 128) None is returned so :func:`quantize` can skip work.
    """
    dt = np.dtype(dtype)
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    s = np.asarray(std, dtype=np.float64).reshape(-1)
    if m.size == 1:
        m = np.repeat(m, 3)
    if s.size == 1:
        s = np.repeat(s, 3)
    if m.shape != (3,) or s.shape != (3,):
        raise BadParameter(f"mean and std need 3 values (RGB), got {m.size} and {s.size}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(s != 0)):
        raise BadParameter(f"invalid normalization mean={m.tolist()} std={s.tolist()}")
    p = np.arange(256, dtype=np.float64)[None, :]
    f = (p - m[:, None]) / s[:, None]
    if dt == np.float32:
        return np.ascontiguousarray(f.astype(np.float32))
    if dt not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int16)):
        raise BadParameter(f"unsupported input tensor dtype {dt}")
    if not (math.isfinite(scale) and scale > 0):
        raise BadParameter(f"input quantization scale must be positive, not {scale}")
    info = np.iinfo(dt)
    q = np.clip(_round_half_away(f / float(scale)) + int(zero_point), info.min, info.max)
    lut = np.ascontiguousarray(q.astype(dt))
    if dt == np.uint8 and np.array_equal(
        lut, np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    ):
        return None
    return lut


def quantize(rgb: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """Apply an :func:`input_lut` table: H x W x 3 uint8 -> H x W x 3 of the table's dtype.

    ``lut=None`` (identity) returns ``rgb`` itself, no copy. One cv2.LUT pass per image; int8
    tables are applied as their uint8 bit patterns and the result reinterpreted (a view).
    """
    _check_rgb(rgb)
    if lut is None:
        return rgb
    if lut.shape != (3, 256):
        raise BadParameter(f"lookup table must have shape (3, 256), not {lut.shape}")
    table = np.ascontiguousarray(lut.T).reshape(1, 256, 3)
    if table.dtype == np.int8:
        return cv2.LUT(rgb, table.view(np.uint8)).view(np.int8)
    if table.dtype in (np.uint8, np.float32, np.int16, np.uint16):
        return cv2.LUT(rgb, table)
    # Other dtypes: numpy gather per channel.
    out = np.empty(rgb.shape, dtype=lut.dtype)
    for c in range(3):
        out[:, :, c] = lut[c][rgb[:, :, c]]
    return out


