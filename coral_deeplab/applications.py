"""DeepLab v3 / v3+ with a MobileNetV2 backbone, built from ops the Edge TPU runs.

(:mod:`segd.tflite.checker` predicts that every op of an int8 v3 export maps; no
``edgetpu_compiler`` was available to confirm it where this was written.)

The network is Google's mobile DeepLab (the ``deeplabv3_mnv2_*pascal*`` Coral models) layer for
layer, so Google's PASCAL VOC weights import by name:

* MobileNetV2 up to ``expanded_conv_16`` (no final 1280-channel conv), TF "SAME" padding on the
  stride-2 convolutions (not keras' ``ZeroPadding2D`` + "valid"), ReLU6, depth multiplier 1.0
  or 0.5 (DeepLab rounds channels to multiples of 8 only at 1.0; at 0.5 it just halves them);
* output stride 16: ``expanded_conv_13`` keeps stride 1 and blocks 14-16 use dilation-2
  depthwise convolutions (one fused DEPTHWISE_CONV_2D each, see :mod:`coral_deeplab.layers`);
* the reduced mobile ASPP: ``aspp0`` (1x1 conv) and image pooling (average over the whole
  map -> 1x1 conv -> broadcast back by concatenated copies), concatenated as
  [image_pooling, aspp0], then ``concat_projection`` (1x1) and ``logits/semantic`` (1x1 with
  bias). ASPP convs use ReLU.

Outputs are logits at stride 16 (v3) or 4 (v3+), without the final upsample: the caller (the
segd engine, or training losses) upsamples to the input size. Layer names are Google's scope
names with ``/`` replaced by ``_`` (``expanded_conv_14_depthwise``, ``logits_semantic``...),
which is what :mod:`coral_deeplab.weights` maps on.

Input sizes: each side ``16k + 1`` (513, 321, 257...), at least 33 — Google's convention, where
feature ``i`` sits exactly on pixel ``16 i`` so upsampling with ``align_corners=True`` is exact
(v3 logits ``k + 1``, v3+ logits ``4k + 1``). Even sizes are refused: TF "SAME" padding pads
them only at the bottom/right, which puts logit ``i`` on pixel ``16 i + 15``. The rules live in
:mod:`segd.geometry`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import tf_keras as keras

from coral_deeplab.layers import BroadcastTo2D, DilatedDepthwiseConv2D, ResizeBilinear
from segd.geometry import OUTPUT_STRIDE, SUPPORTED_ALPHAS, check_alpha, check_input_shape

__all__ = [
    "SUPPORTED_ALPHAS",
    "CoralDeepLabV3",
    "CoralDeepLabV3Plus",
    "validate_input_shape",
]

BN_MOMENTUM = 0.997  # TF-slim MobileNetV2 / DeepLab training scope
BN_EPSILON = 1e-3
# TF-slim's l2_regularizer(4e-5) is 4e-5 * sum(w^2) / 2; keras' L2 has no 1/2.
WEIGHT_DECAY = 2e-5
ASPP_DEPTH = 256
DECODER_DEPTH = 256
SKIP_DEPTH = 48

# (expansion, output channels, stride, repeats) of MobileNetV2 after the first conv.
_MNV2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 3),
    (6, 64, 2, 4),
    (6, 96, 1, 3),
    (6, 160, 2, 3),
    (6, 320, 1, 1),
)


def _depth(channels: int, alpha: float) -> int:
    """DeepLab's channel rule: multiples of 8 at alpha 1.0, plain scaling below.

    (DeepLab passes ``divisible_by=8, min_depth=8`` only for depth multiplier 1.0.)
    """
    if alpha == 1.0:
        return max(8, int(channels + 4) // 8 * 8)
    return max(1, int(channels * alpha))


def validate_input_shape(input_shape: Sequence[Any]) -> tuple[int, int, int]:
    """Check a channels-last ``(H, W, 3)`` shape (rules: :mod:`segd.geometry`);
    return it as ints or raise ValueError."""
    if keras.backend.image_data_format() != "channels_last":
        raise ValueError(
            "coral_deeplab builds channels-last models only; "
            "keras.backend.image_data_format() is 'channels_first'"
        )
    return check_input_shape(input_shape)


def _check_args(alpha: float, n_classes: int) -> None:
    check_alpha(alpha)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")


def _reg() -> keras.regularizers.Regularizer:
    return keras.regularizers.L2(WEIGHT_DECAY)


def _conv_bn(
    x: tf.Tensor,
    filters: int,
    name: str,
    *,
    kernel: int = 1,
    strides: int = 1,
    activation: str | None = "relu6",
) -> tf.Tensor:
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_regularizer=_reg(),
        name=name,
    )(x)
    return _bn_activation(x, name, activation)


def _bn_activation(x: tf.Tensor, name: str, activation: str | None) -> tf.Tensor:
    """BatchNorm (``<name>_BN``) then ReLU6 / ReLU / nothing, named after the conv."""
    x = keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_BN"
    )(x)
    if activation == "relu6":
        return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x)
    if activation == "relu":
        return keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _depthwise_bn(
    x: tf.Tensor,
    name: str,
    *,
    strides: int = 1,
    dilation: int = 1,
    activation: str = "relu6",
) -> tf.Tensor:
    if dilation > 1:
        x = DilatedDepthwiseConv2D(
            3,
            padding="same",
            dilation_rate=dilation,
            use_bias=False,
            depthwise_regularizer=_reg(),
            name=name,
        )(x)
    else:
        x = keras.layers.DepthwiseConv2D(
            3,
            strides=strides,
            padding="same",
            use_bias=False,
            depthwise_regularizer=_reg(),
            name=name,
        )(x)
    return _bn_activation(x, name, activation)


def _mobilenet_v2_os16(
    inputs: tf.Tensor, alpha: float, skip_tap: str = "expanded_conv_2_depthwise"
) -> tuple[tf.Tensor, tf.Tensor]:
    """MobileNetV2 at output stride 16; returns (stride-16 features, stride-4 skip features).

    The skip is DeepLab's ``layer_4/depthwise_output`` by default: the depthwise output of
    ``expanded_conv_2``, the last stride-4 map; the original coral-deeplab's v3+ taps
    ``expanded_conv_3_expand`` (after its ReLU6) instead.
    """
    x = _conv_bn(inputs, _depth(32, alpha), "Conv", kernel=3, strides=2)
    current_stride, rate = 2, 1
    block = 0
    skip = None
    for expansion, channels, stride, repeats in _MNV2_STAGES:
        out_channels = _depth(channels, alpha)
        for i in range(repeats):
            layer_stride = stride if i == 0 else 1
            layer_rate = rate
            if layer_stride > 1 and current_stride >= OUTPUT_STRIDE:
                # Atrous: keep the resolution, dilate every later depthwise conv instead.
                rate *= layer_stride
                layer_stride = 1
            else:
                current_stride *= layer_stride
            prefix = "expanded_conv" if block == 0 else f"expanded_conv_{block}"
            in_channels = int(x.shape[-1])
            h = x
            if expansion != 1:
                h = _conv_bn(h, in_channels * expansion, f"{prefix}_expand")
                if skip_tap == f"{prefix}_expand":
                    skip = h
            h = _depthwise_bn(h, f"{prefix}_depthwise", strides=layer_stride, dilation=layer_rate)
            if skip_tap == f"{prefix}_depthwise":
                skip = h
            h = _conv_bn(h, out_channels, f"{prefix}_project", activation=None)
            if layer_stride == 1 and in_channels == out_channels:
                h = keras.layers.Add(name=f"{prefix}_add")([x, h])
            x = h
            block += 1
    assert skip is not None
    return x, skip


def _aspp(features: tf.Tensor) -> tf.Tensor:
    """Mobile ASPP: aspp0 + image pooling, concat, projection (DeepLab's names and order)."""
    height, width = int(features.shape[1]), int(features.shape[2])
    branch0 = _conv_bn(features, ASPP_DEPTH, "aspp0", activation="relu")
    pooled = keras.layers.AveragePooling2D(
        pool_size=(height, width), strides=1, padding="valid", name="image_pooling_avgpool"
    )(features)
    pooled = _conv_bn(pooled, ASPP_DEPTH, "image_pooling", activation="relu")
    pooled = BroadcastTo2D((height, width), name="image_pooling_broadcast")(pooled)
    x = keras.layers.Concatenate(name="aspp_concat")([pooled, branch0])
    return _conv_bn(x, ASPP_DEPTH, "concat_projection", activation="relu")


def _logits(x: tf.Tensor, n_classes: int) -> tf.Tensor:
    return keras.layers.Conv2D(
        n_classes,
        1,
        padding="same",
        use_bias=True,
        kernel_regularizer=_reg(),
        name="logits_semantic",
    )(x)


def _original_h5(
    weights: str | os.PathLike[str] | None, source: str, arch: str, alpha: float
) -> str | None:
    """The original coral-deeplab .h5 to load (then the model is built in its layout), or None.

    ``weights='pascal_voc'``: by ``source`` (see :func:`coral_deeplab.original_weights.choose_source`);
    a ``.h5`` path with ``source='coral-deeplab'``: that file, read as the original's."""
    from coral_deeplab import original_weights

    if source not in original_weights.SOURCES:
        raise ValueError(f"source must be one of {original_weights.SOURCES}, got {source!r}")
    if weights is None:
        return None
    if isinstance(weights, str) and weights == "pascal_voc":
        path = original_weights.choose_source(source, arch, alpha)
        return None if path is None else str(path)
    return os.fspath(weights) if source == "coral-deeplab" else None


def _input(height: int, width: int, original: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """The model input ``(pixel - 128) / 128``; for the original's weights, rescaled exactly to
    the ``pixel / 255`` they were trained on."""
    inputs = keras.Input(shape=(height, width, 3), name="image")
    if not original:
        return inputs, inputs
    x = keras.layers.Rescaling(128.0 / 255.0, offset=128.0 / 255.0, name="input_to_0_1")(inputs)
    return inputs, x


def _load(
    model: keras.Model,
    weights: str | os.PathLike[str] | None,
    alpha: float,
    n_classes: int,
    *,
    encoder_only: bool,
    original_h5: str | None = None,
) -> None:
    if weights is None:
        return
    if original_h5 is not None:
        from coral_deeplab.original_weights import apply_weights, read_h5_weights

        arrays = read_h5_weights(original_h5)
        apply_weights(model, arrays, skip_logits=n_classes != _logits_classes(arrays))
        return
    if isinstance(weights, str) and weights == "pascal_voc":
        from coral_deeplab.weights import load_pascal_voc

        load_pascal_voc(model, alpha=alpha, skip_logits=(n_classes != 21 or encoder_only))
        return
    path = os.fspath(weights)
    if not os.path.exists(path):
        raise ValueError(
            f"weights must be None, 'pascal_voc' or the path of a weights file; {path!r} "
            "does not exist"
        )
    model.load_weights(path)


def _logits_classes(weights: Mapping[str, Mapping[str, Any]]) -> int:
    """Classes of the original file's logits layer (-1 when it has none)."""
    bias = weights.get("logits/semantic", {}).get("bias")
    return -1 if bias is None else int(bias.shape[0])


def CoralDeepLabV3(
    input_shape: Sequence[int] = (513, 513, 3),
    alpha: float = 1.0,
    n_classes: int = 21,
    weights: str | os.PathLike[str] | None = None,
    source: str = "auto",
) -> keras.Model:
    """DeepLab v3, MobileNetV2 backbone, output stride 16, Edge-TPU-mappable.

    Args:
        input_shape: ``(H, W, 3)``; each side 16k+1 (like Google's 513), >= 33.
        alpha: MobileNetV2 depth multiplier, 1.0 or 0.5 (the two Google published).
        n_classes: number of classes (PASCAL VOC: 21, background included).
        weights: None (random init), ``'pascal_voc'`` (PASCAL VOC weights from ``source``;
            with ``n_classes != 21`` everything but the logits layer is loaded — the
            fine-tuning start point), or a path (``load_weights``; with
            ``source='coral-deeplab'`` an original coral-deeplab ``.h5``).
        source: where ``'pascal_voc'`` comes from: ``'coral-deeplab'`` (the original's trained
            ``.h5`` from Google Drive, md5-checked; see :mod:`coral_deeplab.original_weights`),
            ``'google-tflite'`` (Google's Coral model, imported from its .tflite) or ``'auto'``
            (the original's when it can be fetched, else Google's with a UserWarning).

    The model takes float input ``(pixel - 128) / 128`` (with the original's weights a
    ``Rescaling`` layer first turns it into the ``pixel / 255`` they were trained on) and returns
    logits ``((H - 1)/16 + 1, (W - 1)/16 + 1, n_classes)``, logit ``i`` on pixel ``16 i`` — no
    final upsample.
    """
    height, width, _ = validate_input_shape(input_shape)
    _check_args(alpha, n_classes)
    h5 = _original_h5(weights, source, "v3", alpha)
    inputs, x = _input(height, width, h5 is not None)
    features, _ = _mobilenet_v2_os16(x, alpha)
    outputs = _logits(_aspp(features), n_classes)
    model = keras.Model(inputs, outputs, name="CoralDeepLabV3")
    _load(model, weights, alpha, n_classes, encoder_only=False, original_h5=h5)
    return model


def CoralDeepLabV3Plus(
    input_shape: Sequence[int] = (513, 513, 3),
    alpha: float = 1.0,
    n_classes: int = 21,
    weights: str | os.PathLike[str] | None = None,
    source: str = "auto",
) -> keras.Model:
    """DeepLab v3+: the v3 encoder plus DeepLab's decoder, logits at output stride 4.

    Decoder (DeepLab's): ``feature_projection0`` (1x1, 48 ch) on the stride-4 depthwise output
    of ``expanded_conv_2``; the encoder output is bilinearly resized to the stride-4 grid with
    ``align_corners=True`` (exact: on a 16k+1 input encoder feature ``i`` sits on pixel
    ``16 i`` and skip feature ``j`` on ``4 j``, so corners align), concatenated, then two separable
    3x3 convs (depthwise + BN + ReLU, pointwise + BN + ReLU, 256 ch) and a 1x1 logits conv.

    ``weights='pascal_voc'`` with the original coral-deeplab's trained v3+ weights (``source``
    ``'coral-deeplab'``, or ``'auto'`` when they can be fetched) loads the whole network, built
    in the original's decoder layout: skip from ``expanded_conv_3_expand`` (after ReLU6) and
    two full 3x3 convolutions ``decoder_conv0/1``. From Google's .tflite (``'google-tflite'``,
    or ``'auto'`` offline) only the encoder is loaded (backbone + ASPP): Google published no v3+
    mobile PASCAL model, so DeepLab's decoder and the logits start from random initialisation.
    Arguments are as for :func:`CoralDeepLabV3`. Output: ``((H - 1)/4 + 1, (W - 1)/4 + 1,
    n_classes)``, logit ``i`` on pixel ``4 i``.
    """
    from coral_deeplab.original_weights import SKIP_TAP

    height, width, _ = validate_input_shape(input_shape)
    _check_args(alpha, n_classes)
    h5 = _original_h5(weights, source, "v3plus", alpha)
    inputs, x = _input(height, width, h5 is not None)
    if h5 is None:
        features, skip = _mobilenet_v2_os16(x, alpha)
    else:
        features, skip = _mobilenet_v2_os16(x, alpha, skip_tap=SKIP_TAP)
    encoded = _aspp(features)
    skip_size = (int(skip.shape[1]), int(skip.shape[2]))
    skip = _conv_bn(skip, SKIP_DEPTH, "feature_projection0", activation="relu")
    up = ResizeBilinear(skip_size, align_corners=True, name="decoder_upsample")(encoded)
    x = keras.layers.Concatenate(name="decoder_concat")([up, skip])
    for i in range(2):
        if h5 is None:
            x = _depthwise_bn(x, f"decoder_conv{i}_depthwise", activation="relu")
            x = _conv_bn(x, DECODER_DEPTH, f"decoder_conv{i}_pointwise", activation="relu")
        else:
            x = _conv_bn(x, DECODER_DEPTH, f"decoder_conv{i}", kernel=3, activation="relu")
    outputs = _logits(x, n_classes)
    model = keras.Model(inputs, outputs, name="CoralDeepLabV3Plus")
    _load(model, weights, alpha, n_classes, encoder_only=True, original_h5=h5)
    return model
