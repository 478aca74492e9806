"""Mean IoU with per-class IoU, from a confusion matrix over labelled pixels (255 ignored).

The definition is :mod:`segd.metrics`' (one matrix summed over every pixel of every image,
``IoU_c = TP / (TP + FP + FN)``, mean over the classes that occur) so training-time numbers and
``segd eval`` numbers mean the same thing; the numpy helpers are re-exported from there.
Predictions are the argmax of the logits upsampled like :mod:`coral_deeplab.losses` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from coral_deeplab.losses import IGNORE_LABEL, upsample_logits
from segd.metrics import iou_per_class, mean_iou

__all__ = [
    "SegmentationMeanIoU",
    "batch_confusion",
    "iou_per_class",
    "mean_iou",
    "predict_labels",
]


def predict_labels(logits: tf.Tensor, size_hw: Any, *, align_corners: bool = True) -> tf.Tensor:
    """(B, H, W) int32 class map: argmax of the upsampled logits."""
    up = upsample_logits(tf.cast(logits, tf.float32), size_hw, align_corners=align_corners)
    return tf.argmax(up, axis=-1, output_type=tf.int32)


def batch_confusion(
    labels: tf.Tensor, predictions: tf.Tensor, n_classes: int, *, ignore_label: int = IGNORE_LABEL
) -> tf.Tensor:
    """``cm[truth, prediction]`` (int64, n x n) over the pixels whose label is not ignored."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    predictions = tf.reshape(tf.cast(predictions, tf.int32), [-1])
    valid = tf.not_equal(labels, ignore_label)
    return tf.math.confusion_matrix(
        tf.boolean_mask(labels, valid),
        tf.boolean_mask(predictions, valid),
        num_classes=n_classes,
        dtype=tf.int64,
    )


class SegmentationMeanIoU(keras.metrics.Metric):
    """Streaming mIoU of (labels, stride logits) pairs, e.g. for ``model.compile(metrics=...)``.

    ``result()`` is the mean over classes that occur; :meth:`per_class` gives every IoU (NaN for
    classes that never occur) and :attr:`confusion` the accumulated matrix.
    """

    def __init__(
        self,
        n_classes: int,
        *,
        align_corners: bool = True,
        ignore_label: int = IGNORE_LABEL,
        name: str = "miou",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.n_classes = int(n_classes)
        self.align_corners = bool(align_corners)
        self.ignore_label = int(ignore_label)
        self.total = self.add_weight(
            "confusion", shape=(self.n_classes, self.n_classes), initializer="zeros", dtype=tf.int64
        )

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> Any:
        labels = tf.cast(y_true, tf.int32)
        if labels.shape.rank == 4:
            labels = labels[..., 0]
        pred = predict_labels(y_pred, tf.shape(labels)[1:3], align_corners=self.align_corners)
        return self.total.assign_add(
            batch_confusion(labels, pred, self.n_classes, ignore_label=self.ignore_label)
        )

    def result(self) -> tf.Tensor:
        cm = tf.cast(self.total, tf.float64)
        tp = tf.linalg.diag_part(cm)
        union = tf.reduce_sum(cm, 0) + tf.reduce_sum(cm, 1) - tp
        present = union > 0
        iou = tf.boolean_mask(tp, present) / tf.boolean_mask(union, present)
        return tf.cast(tf.reduce_mean(iou), tf.float32)  # NaN when no class occurs

    def reset_state(self) -> None:
        self.total.assign(tf.zeros_like(self.total))

    @property
    def confusion(self) -> np.ndarray:
        return np.asarray(self.total.numpy())

    def per_class(self) -> np.ndarray:
        return iou_per_class(self.confusion)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "n_classes": self.n_classes,
            "align_corners": self.align_corners,
            "ignore_label": self.ignore_label,
        }
