"""Input sizes, depth multipliers and the logits grid of coral_deeplab models — the one place
these rules live (TensorFlow-free, so segd can use it on a Pi).

Only inputs of ``16k + 1`` pixels per side are supported (513, 321, 257, 129, 65...). Why:
the stride-2 convolutions use TF "SAME" padding. On an odd side ``2m + 1`` the output has
``m + 1`` samples and SAME pads one pixel on each side, so output ``j`` is centred on input
pixel ``2 j``; four such stages put feature (and logit) ``i`` exactly on pixel ``16 i`` (and
the v3+ stride-4 map on ``4 i``). That is Google's DeepLab geometry, and upsampling the logits
with ``align_corners=True`` is then exact — in the training loss, in the v3+ decoder, and in
segd's postprocess. On an even side SAME pads 0 pixels before and 1 after, so output ``j``
sits on pixel ``2 j + 1`` and logit ``i`` on ``16 i + 15``: neither align-corners nor
half-pixel upsampling (``16 i + 7.5``) matches that grid, and the served masks would be
shifted by up to 7.5 pixels. Such sizes are refused with a GeometryError (a ValueError) saying so.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from segd.errors import GeometryError

__all__ = [
    "MIN_SIDE",
    "OUTPUT_STRIDE",
    "SUPPORTED_ALPHAS",
    "check_alpha",
    "check_input_hw",
    "check_input_shape",
    "check_side",
    "logits_hw",
    "nearest_supported",
    "output_geometry",
]

#: MobileNetV2 depth multipliers coral_deeplab builds (the two Google published weights for).
SUPPORTED_ALPHAS = (1.0, 0.5)
#: The encoder's output stride (v3 logits; v3+ logits are at stride 4).
OUTPUT_STRIDE = 16
#: Smallest side: 16 * 2 + 1, a 3x3 stride-16 feature map.
MIN_SIDE = 33


def nearest_supported(side: int) -> tuple[int, int]:
    """The supported sides just below and above ``side`` (``16k + 1``, at least MIN_SIDE)."""
    below = max(MIN_SIDE, (side - 1) // OUTPUT_STRIDE * OUTPUT_STRIDE + 1)
    above = max(MIN_SIDE, below if below >= side else below + OUTPUT_STRIDE)
    return below, above


def check_side(side: Any, what: str = "input side") -> int:
    """``side`` as an int if it is a supported input side (``16k + 1``, >= 33), else GeometryError."""
    if isinstance(side, bool):
        raise GeometryError(f"{what} must be an integer, got {side!r}")
    try:
        value = int(side)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} must be an integer, got {side!r}") from None
    if value != side:
        raise GeometryError(f"{what} must be an integer, got {side!r}")
    if value < MIN_SIDE:
        raise GeometryError(f"{what} {value} is below the minimum of {MIN_SIDE} (16 * 2 + 1)")
    if value % OUTPUT_STRIDE != 1:
        below, above = nearest_supported(value)
        reason = (
            "with TF 'SAME' padding an even side is padded only at the bottom/right, which "
            "puts logit i on pixel 16 i + 15 — a grid no bilinear upsampling convention matches"
            if value % 2 == 0
            else "only 16k+1 sides put logit i exactly on pixel 16 i"
        )
        raise GeometryError(
            f"{what} {value} is not 16k+1 (use {below} or {above}, like Google's 513): {reason}"
        )
    return value


def check_input_hw(hw: Sequence[Any], what: str = "input") -> tuple[int, int]:
    """(height, width) as ints when both sides are supported (see :func:`check_side`)."""
    if len(hw) != 2:
        raise GeometryError(f"{what} size must be (height, width), got {hw!r}")
    return check_side(hw[0], f"{what} height"), check_side(hw[1], f"{what} width")


def check_input_shape(input_shape: Sequence[Any]) -> tuple[int, int, int]:
    """A channels-last ``(H, W, 3)`` model input shape as ints, or GeometryError."""
    shape = tuple(input_shape)
    if len(shape) != 3 or any(s is None for s in shape):
        raise GeometryError(f"input_shape must be a fully defined (H, W, 3), got {input_shape!r}")
    try:
        height, width, channels = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise GeometryError(f"input_shape must be integers, got {input_shape!r}") from None
    if channels != 3:
        if height == 3 and channels > 3:
            raise GeometryError(
                f"input_shape {shape} looks channels-first; give (H, W, 3) (channels last)"
            )
        raise GeometryError(f"input_shape must have 3 (RGB) channels last, got {shape}")
    height, width = check_input_hw((height, width))
    return height, width, channels


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float if it is a supported depth multiplier, else GeometryError."""
    value = float(alpha) if isinstance(alpha, numbers.Real) else float("nan")
    if isinstance(alpha, bool) or value not in SUPPORTED_ALPHAS:
        raise GeometryError(
            f"alpha must be one of {SUPPORTED_ALPHAS} (the depth multipliers Google published "
            f"PASCAL VOC weights for), got {alpha!r}"
        )
    return value


def logits_hw(input_hw: Sequence[int], stride: int) -> tuple[int, int]:
    """Logits grid of a supported input at ``stride`` (16 for v3, 4 for v3+): ``(N - 1) / s + 1``."""
    height, width = check_input_hw(input_hw)
    return (height - 1) // stride + 1, (width - 1) // stride + 1


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def output_geometry(input_hw: Sequence[int], logits_hw: Sequence[int]) -> tuple[int, bool]:
    """(stride, align_corners) of a ``[1, h, w, C]`` logits grid for a ``[1, H, W, 3]`` input.

    The grid must be the one coral_deeplab and Google's DeepLab models produce: logit ``i`` on
    pixel ``s i`` with ``N - 1 = s (n - 1)`` on both axes and ``s`` a power of two, which is the
    align-corners geometry (so ``align_corners`` is always True; it is returned for the
    manifest). Even input sides are refused (see the module docstring): from the tensor shapes
    alone their logit positions cannot be known, and for TF "SAME" models no upsampling
    convention matches them. GeometryError for anything else.
    """
    if len(input_hw) != 2 or len(logits_hw) != 2:
        raise GeometryError(f"expected (H, W) and (h, w), got {input_hw!r} and {logits_hw!r}")
    strides = set()
    for axis, big, small in zip(("height", "width"), input_hw, logits_hw, strict=True):
        big, small = int(big), int(small)
        if small < 2 or big < small:
            raise GeometryError(
                f"logits {axis} {small} vs input {axis} {big}: not a dense prediction grid"
            )
        if big % 2 == 0:
            raise GeometryError(
                f"input {axis} {big} is even: its logits grid does not line up with the pixel "
                "grid (TF 'SAME' padding puts logit i on pixel s i + s - 1), so no upsampling "
                "convention is exact; only 16k+1 inputs such as 513 are supported"
            )
        if (big - 1) % (small - 1) or not _power_of_two((big - 1) // (small - 1)):
            raise GeometryError(
                f"logits {tuple(logits_hw)} do not line up with input {tuple(input_hw)}: "
                "expected N - 1 = s (n - 1) on each axis with s a power of two (513 -> 33)"
            )
        strides.add((big - 1) // (small - 1))
    if len(strides) != 1:
        raise GeometryError(
            f"height and width disagree on the stride: {sorted(strides)} "
            f"(input {tuple(input_hw)}, logits {tuple(logits_hw)})"
        )
    return strides.pop(), True
