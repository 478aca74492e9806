"""Segmentation metrics — the standard definition (PASCAL VOC, DeepLab), shared by ``segd eval``
and ``coral_deeplab``'s training: one confusion matrix summed over all pixels of all images,
then ``IoU_c = TP / (TP + FP + FN)`` per class and mIoU = the mean over classes that occur at
all (in truth or prediction); a class with an empty union has no IoU (NaN), rather than a
misleading 0 or 1.
"""

from __future__ import annotations

import math

import numpy as np

from segd.dataset import IGNORE_LABEL

__all__ = ["confusion_matrix", "iou_per_class", "mean_iou", "pixel_accuracy"]


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, n_classes: int, *, ignore: int = IGNORE_LABEL
) -> np.ndarray:
    """``cm[t, p]`` = pixels of true class t predicted as p (int64, n x n); ``ignore`` skipped.

    ValueError if shapes differ or a true label (other than ``ignore``) or a prediction is
    outside ``0..n_classes-1`` — silently dropping them would inflate the score.
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    if n_classes < 1:
        raise ValueError("n_classes must be >= 1")
    valid = truth != ignore
    t = truth[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    for name, v in (("label", t), ("prediction", p)):
        if v.size and (int(v.min()) < 0 or int(v.max()) >= n_classes):
            bad = sorted({int(x) for x in np.unique(v) if not 0 <= x < n_classes})[:5]
            raise ValueError(f"{name} class id(s) {bad} outside 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class, float64; NaN where the class never occurs at all."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes that occur (NaN if none does)."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of labelled (non-ignored) pixels predicted right."""
    total = int(np.asarray(cm).sum())
    return float(np.trace(cm)) / total if total else math.nan


