"""Segmentation loss that ignores label 255, computed on bilinearly upsampled logits.

coral_deeplab models output logits at the output stride (v3: 1/16 of the input, v3+: 1/4)
without a final upsample. Two ways exist to compare them with full-resolution labels: shrink
the labels to the logits grid (nearest), or upsample the logits to the label size. This module
does the latter, as DeepLab does by default (``upsample_logits=True``), because:

* it trains exactly what is served: segd's mask is the argmax of the logits bilinearly
  upsampled with the same geometry (``align_corners=True``: coral_deeplab inputs are 16k+1,
  such as 513, where logit ``i`` sits on pixel ``16 i`` — see :mod:`segd.geometry`),
  so the loss scores the very mask the user gets, object borders included;
* nearest-downsampled labels keep one pixel in 256 at stride 16 — a 129x129 crop leaves 81
  labels, thin or small objects vanish and the gradient is noisy;
* the cost is small: the upsampled tensor is (B, H, W, classes) floats, a few MB.

The loss is the mean softmax cross-entropy over labelled pixels (label != 255) of the batch
(DeepLab's ``SUM_BY_NONZERO_WEIGHTS``); a batch without labelled pixels contributes 0.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras

from segd import dataset

__all__ = [
    "IGNORE_LABEL",
    "SegmentationLoss",
    "masked_cross_entropy",
    "upsample_logits",
]

IGNORE_LABEL = dataset.IGNORE_LABEL  # one value for the loss, the metrics and the datasets


def upsample_logits(logits: tf.Tensor, size_hw: Any, *, align_corners: bool = True) -> tf.Tensor:
    """Bilinear resize of (B, h, w, C) logits to ``size_hw`` with TF1 corner semantics
    (the geometry of :class:`segd.postprocess.SampleGrid` and Google's DeepLab files)."""
    return tf.compat.v1.image.resize_bilinear(
        logits, size_hw, align_corners=align_corners, half_pixel_centers=not align_corners
    )


def masked_cross_entropy(
    labels: tf.Tensor, logits: tf.Tensor, *, align_corners: bool = True, ignore_label: int = IGNORE_LABEL
) -> tf.Tensor:
    """Mean cross-entropy over labelled pixels of (B, H, W) labels vs (B, h, w, C) logits."""
    labels = tf.cast(labels, tf.int32)
    if labels.shape.rank == 4:
        labels = labels[..., 0]
    up = upsample_logits(tf.cast(logits, tf.float32), tf.shape(labels)[1:3], align_corners=align_corners)
    valid = tf.not_equal(labels, ignore_label)
    safe = tf.where(valid, labels, tf.zeros_like(labels))
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=up)
    weights = tf.cast(valid, tf.float32)
    return tf.reduce_sum(per_pixel * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


class SegmentationLoss(keras.losses.Loss):
    """:func:`masked_cross_entropy` as a keras loss, for ``model.compile(loss=...)``."""

    def __init__(
        self, *, align_corners: bool = True, ignore_label: int = IGNORE_LABEL, name: str = "segmentation_ce"
    ) -> None:
        # The function already averages over the batch's labelled pixels.
        super().__init__(name=name, reduction=keras.losses.Reduction.NONE)
        self.align_corners = bool(align_corners)
        self.ignore_label = int(ignore_label)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return masked_cross_entropy(
            y_true, y_pred, align_corners=self.align_corners, ignore_label=self.ignore_label
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "align_corners": self.align_corners,
            "ignore_label": self.ignore_label,
        }
