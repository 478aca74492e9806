"""Keras layers whose TFLite conversion is a single Edge-TPU-mappable op.

Three places in DeepLab convert badly when written with stock keras layers, so each gets a
tiny layer that pins the TensorFlow op the converter sees:

* dilated depthwise convolution — ``keras.layers.DepthwiseConv2D(dilation_rate=2)`` (and
  ``tf.nn.depthwise_conv2d``) is traced as SPACE_TO_BATCH_ND + DEPTHWISE_CONV_2D +
  BATCH_TO_SPACE_ND, which the Edge TPU does not run. The converter re-fuses that pattern only
  when every shape is static (batch included; ``TFLiteConverter.from_keras_model`` keeps keras'
  dynamic batch and leaves the three ops). The raw ``DepthwiseConv2dNative`` op with
  ``dilations`` converts to one DEPTHWISE_CONV_2D carrying the dilation factor in every case —
  the form of Google's own DeepLab files — without relying on that pass;
* the image-pooling broadcast 1x1 -> HxW — Google's files use RESIZE_BILINEAR from a 1x1 map,
  where the Edge TPU segment of their compiled model ends; broadcasting a single pixel gives
  the same numbers, written as concatenated copies (see :class:`BroadcastTo2D` for why not
  TILE);
* bilinear resize with explicit ``align_corners`` — ``keras.layers.UpSampling2D`` and
  ``tf.image.resize`` only do half-pixel centres, while DeepLab's geometry for sizes 16k+1 is
  align-corners.

Every layer is registered with ``keras.utils.register_keras_serializable``, so saved models
and configs load without a ``custom_objects`` mapping. Everything here is importable only with
TensorFlow and tf_keras.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras


@keras.utils.register_keras_serializable(package="coral_deeplab")
class DilatedDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """Stride-1 depthwise convolution that stays one DEPTHWISE_CONV_2D op when dilated.

    Same weights and config as ``keras.layers.DepthwiseConv2D`` (so it trains, saves and
    loads identically); only ``call`` differs: it issues ``DepthwiseConv2dNative`` with the
    dilation in the op attributes instead of letting TensorFlow wrap the convolution in
    space-to-batch / batch-to-space.
    """

    def __init__(self, kernel_size: Any = 3, **kwargs: Any) -> None:
        super().__init__(kernel_size, **kwargs)
        if tuple(self.strides) != (1, 1):
            raise ValueError("DilatedDepthwiseConv2D supports only strides=1")
        if self.depth_multiplier != 1:
            raise ValueError("DilatedDepthwiseConv2D supports only depth_multiplier=1")
        if self.data_format != "channels_last":
            raise ValueError("DilatedDepthwiseConv2D supports only channels_last")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        rate_h, rate_w = self.dilation_rate
        outputs = tf.raw_ops.DepthwiseConv2dNative(
            input=inputs,
            filter=tf.cast(self.depthwise_kernel, inputs.dtype),
            strides=[1, 1, 1, 1],
            padding=self.padding.upper(),
            dilations=[1, rate_h, rate_w, 1],
        )
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


@keras.utils.register_keras_serializable(package="coral_deeplab")
class BroadcastTo2D(keras.layers.Layer):
    """Broadcast a 1x1 feature map to ``size`` = (h, w) by concatenating copies.

    Equal, value for value, to DeepLab's align-corners bilinear resize of a single pixel (a
    copy is exact in any quantization), but converts to two CONCATENATION ops (w copies along
    the width, then h copies of that row). The alternatives are worse on the Edge TPU: Google's
    RESIZE_BILINEAR from 1x1 ends the TPU segment of their compiled PASCAL models; TILE (what
    EdgeTPU-DeepLab-slim uses, uint8, op version 1) becomes op version 3 for int8 tensors, a
    version newer than the last Edge TPU compiler; BROADCAST_TO is not an Edge TPU op.
    """

    def __init__(self, size: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (int(size[0]), int(size[1]))

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        height, width = self.size
        row = tf.concat([inputs] * width, axis=2) if width > 1 else inputs
        return tf.concat([row] * height, axis=1) if height > 1 else row

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        shape = tf.TensorShape(input_shape).as_list()
        if shape[1] != 1 or shape[2] != 1:
            raise ValueError(f"BroadcastTo2D expects a 1x1 map, got {shape}")
        return (shape[0], self.size[0], self.size[1], shape[3])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size}


@keras.utils.register_keras_serializable(package="coral_deeplab")
class ResizeBilinear(keras.layers.Layer):
    """Bilinear resize to a fixed ``size`` with TF1 ``align_corners`` semantics.

    Converts to one RESIZE_BILINEAR op with ``align_corners`` set and ``half_pixel_centers``
    false — the variant DeepLab was trained with and the one Google's files contain.
    """

    def __init__(self, size: tuple[int, int], align_corners: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (int(size[0]), int(size[1]))
        self.align_corners = bool(align_corners)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        out = tf.compat.v1.image.resize_bilinear(
            inputs, self.size, align_corners=self.align_corners, half_pixel_centers=False
        )
        return tf.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        shape = tf.TensorShape(input_shape).as_list()
        return (shape[0], self.size[0], self.size[1], shape[3])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size, "align_corners": self.align_corners}

