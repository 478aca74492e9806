"""A minimal builder of the original coral-deeplab networks, written here from its architecture
(github.com/xadrianzetx/coral-deeplab at e485684: ``_encoders.mobilenetv2``, ``_blocks``,
``applications``), reproducing its layer names, channel counts, strides, dilations and input
scaling (images in 0..1) — so tests can make ``.h5`` files shaped like the ones it published
without its code or its files. Standard keras layers only (a broadcast UpSampling2D where it
resizes a 1x1 map, a Lambda align-corners resize in the v3+ decoder, as it does).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras

L = keras.layers

# MobileNetV2 blocks 1..16 as the original builds them:
# (expand channels, project channels, stride, dilation, residual add) at depth multiplier 1.
BLOCKS: tuple[tuple[int, int, int, int, bool], ...] = (
    (96, 24, 2, 1, False), (144, 24, 1, 1, True),
    (144, 32, 2, 1, False), (192, 32, 1, 1, True), (192, 32, 1, 1, True),
    (192, 64, 2, 1, False), (384, 64, 1, 1, True), (384, 64, 1, 1, True), (384, 64, 1, 1, True),
    (384, 96, 1, 1, False), (576, 96, 1, 1, True), (576, 96, 1, 1, True),
    (576, 160, 1, 1, False), (960, 160, 1, 2, True), (960, 160, 1, 2, True),
    (960, 320, 1, 2, False),
)  # fmt: skip


def _bn_relu(x: Any, name: str, relu: float | None) -> Any:
    x = L.BatchNormalization(name=f"{name}/BatchNorm")(x)
    if relu == 6.0:
        return L.ReLU(6.0, name=f"{name}/relu")(x)
    if relu == 0.0:
        return L.ReLU(name=f"{name}/relu")(x)
    return x


def _conv(x: Any, filters: int, name: str, relu: float | None, kernel: int = 1, stride: int = 1) -> Any:
    x = L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    return _bn_relu(x, name, relu)


def _depthwise(x: Any, name: str, stride: int = 1, dilation: int = 1) -> Any:
    x = L.DepthwiseConv2D(3, strides=stride, padding="same", dilation_rate=dilation, use_bias=False, name=name)(x)
    return _bn_relu(x, name, 6.0)


def build(arch: str, size: int, alpha: float, n_classes: int = 21) -> keras.Model:
    """The original's DeepLab v3 (``arch='v3'``) or v3+ (``'v3plus'``): input 0..1 floats."""
    inputs = keras.Input((size, size, 3))
    x = _conv(inputs, int(alpha * 32), "Conv", 6.0, kernel=3, stride=2)
    x = _depthwise(x, "expanded_conv/depthwise")
    x = _conv(x, int(alpha * 16), "expanded_conv/project", None)
    skip = None
    for n, (expand, project, stride, dilation, residual) in enumerate(BLOCKS, start=1):
        prefix = f"expanded_conv_{n}"
        h = _conv(x, int(alpha * expand), f"{prefix}/expand", 6.0)
        if n == 3:
            skip = h  # the v3+ decoder's tap: expanded_conv_3/expand/relu
        h = _depthwise(h, f"{prefix}/depthwise", stride, dilation)
        h = _conv(h, int(alpha * project), f"{prefix}/project", None)
        x = L.Add(name=f"{n}_add")([x, h]) if residual else h
    hw = (int(x.shape[1]), int(x.shape[2]))
    b0 = _conv(x, 256, "aspp0", 0.0)
    b4 = L.AveragePooling2D(pool_size=hw, strides=1)(x)
    b4 = _conv(b4, 256, "image_pooling", 0.0)
    b4 = L.UpSampling2D(size=hw)(b4)  # a 1x1 map resized: every pixel the same value
    x = L.Concatenate(name="aspp_concat")([b4, b0])
    x = _conv(x, 256, "concat_projection", 0.0)
    if arch == "v3plus":
        assert skip is not None
        s = _conv(skip, 48, "skip_con_conv", 0.0)
        shw = (int(s.shape[1]), int(s.shape[2]))
        x = L.Lambda(lambda t: tf.compat.v1.image.resize_bilinear(t, shw, align_corners=True), name="aspp_resize")(x)
        x = L.Concatenate(name="decoder_concat")([x, s])
        x = _conv(x, 256, "decoder_conv_1", 0.0, kernel=3)
        x = _conv(x, 256, "decoder_conv_2", 0.0, kernel=3)
    outputs = L.Conv2D(n_classes, 1, padding="same", name="logits/semantic")(x)
    return keras.Model(inputs, outputs, name=f"original_{arch}")


def randomize(model: keras.Model, seed: int = 0) -> None:
    """Random weights everywhere, BatchNorm statistics included (positive variances), so a
    mapping mistake anywhere changes the output."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            short = w.name.rsplit("/", 1)[-1].split(":")[0]
            shape = tuple(w.shape)
            if short == "moving_variance":
                values.append(rng.uniform(0.5, 1.5, shape).astype("float32"))
            elif short == "gamma":
                values.append(rng.uniform(0.8, 1.2, shape).astype("float32"))
            elif short in ("kernel", "depthwise_kernel"):
                fan_in = int(np.prod(shape[:-1])) if short == "kernel" else int(np.prod(shape[:2]))
                values.append((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype("float32"))
            else:
                values.append((rng.standard_normal(shape) * 0.1).astype("float32"))
        if values:
            layer.set_weights(values)
