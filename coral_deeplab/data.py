"""tf.data input pipelines for training DeepLab on labelled images.

Datasets are read in the two layouts :mod:`segd.eval <segd.evaluate>` scores (the same discovery code, so
what trains is what evaluates): PASCAL VOC (``JPEGImages/``, ``SegmentationClass/`` palette
PNGs, ``ImageSets/Segmentation/{train,val}.txt``) or a folder pair ``images/`` + ``masks/``
with same-named PNG masks. Mask pixels are class ids; 255 means "ignore".

Images are decoded by segd's own decoder (:func:`segd.dataset.read_sample`: EXIF orientation
applied, exactly like the daemon sees them) and masks by :func:`segd.dataset.read_mask`
(palette indices, not colours). Both run in ``tf.numpy_function``: TensorFlow's PNG decoder
expands palettes to colours, and a second decoder would be a second truth.

Training augmentation is DeepLab's (``input_preprocess.preprocess_image_and_label``): random
scale in [0.5, 2.0] (steps of 0.25 by default, as DeepLab's PASCAL recipe), image bilinear and
label nearest; pad bottom/right to the crop size with grey 128 (0.0 after normalisation, the
value a letterboxed input is padded with at serving time) and label 255; random crop; random
horizontal flip. The network input is ``(pixel - 128) / 128``.

Determinism: the sample order of epoch ``e`` is a stateless shuffle keyed on ``(seed, e)`` and
every augmentation draw on ``(seed, e * n + sample index)``, so a stream is a pure function of
the seed — and resuming at step ``s`` (``start_step``) yields exactly the batches an
uninterrupted run would have seen from step ``s`` on, without decoding the skipped ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from segd.dataset import (
    IGNORE_LABEL,
    Sample,
    dataset_layout,
    folder_samples,
    read_mask,
    read_sample,
    voc_samples,
)
from segd.errors import DatasetError

__all__ = [
    "IGNORE_LABEL",
    "PAD_PIXEL",
    "Augment",
    "Sample",
    "augment_pair",
    "check_masks",
    "dataset_error",
    "eval_dataset",
    "infer_num_classes",
    "letterbox_pair",
    "load_pair",
    "normalize",
    "split_samples",
    "train_dataset",
]

PAD_PIXEL = 128.0  # grey: 0.0 after normalisation
_INPUT_ZERO, _INPUT_SCALE = 128.0, 1.0 / 128.0


@dataclass(frozen=True)
class Augment:
    """DeepLab's training augmentation parameters."""

    min_scale: float = 0.5
    max_scale: float = 2.0
    #: Scales are drawn from ``min, min + step, ..., max``; 0 draws them uniformly.
    scale_step: float = 0.25
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if self.scale_step < 0:
            raise ValueError("scale_step must be >= 0")

    def scales(self) -> list[float] | None:
        """The discrete scale choices, or None for a continuous draw."""
        if self.scale_step == 0 or self.min_scale == self.max_scale:
            return None if self.min_scale != self.max_scale else [self.min_scale]
        n = math.floor((self.max_scale - self.min_scale) / self.scale_step + 1e-9) + 1
        return [self.min_scale + i * self.scale_step for i in range(n)]


# --- samples ---------------------------------------------------------------------------------
def _holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic hold-out: a seeded permutation's first ``ceil(fraction * n)`` samples."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    if fraction >= 1:
        raise DatasetError(f"val_fraction must be below 1, got {fraction}")
    n_val = min(len(samples) - 1, max(1, math.ceil(fraction * len(samples))))
    order = np.random.default_rng(seed).permutation(len(samples))
    val_idx = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def split_samples(
    root: str | Path,
    *,
    train_split: str = "train",
    val_split: str = "val",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[Sample], list[Sample]]:
    """(train, val) samples of a dataset directory.

    VOC layout: the ``train_split``/``val_split`` lists. Folder pair: ``<split>.txt`` lists
    when present, else every image, with a seeded ``val_fraction`` held out for validation
    (a missing val list in a VOC layout is handled the same way).
    """
    root = Path(root)
    layout = dataset_layout(root)
    if layout == "voc":
        train = voc_samples(root, train_split)
        val_file = root / "ImageSets" / "Segmentation" / f"{val_split}.txt"
        if val_file.is_file():
            return train, voc_samples(root, val_split)
        return _holdout(train, val_fraction, seed)
    train_file, val_file = root / f"{train_split}.txt", root / f"{val_split}.txt"
    train = folder_samples(root, train_split if train_file.is_file() else None)
    if val_file.is_file():
        val = folder_samples(root, val_split)
        if not train_file.is_file():
            val_ids = {s.id for s in val}
            train = [s for s in train if s.id not in val_ids]
        return train, val
    return _holdout(train, val_fraction, seed)


def _sample_mask(sample: Sample) -> np.ndarray:
    """A sample's class-id mask; errors name the sample and the file."""
    try:
        return read_mask(sample.mask.read_bytes())
    except OSError as exc:
        raise DatasetError(f"{sample.id}: cannot read {sample.mask}: {exc.strerror}") from exc
    except DatasetError as exc:
        raise DatasetError(f"{sample.id}: {sample.mask.name}: {exc.detail}") from exc


def infer_num_classes(samples: Sequence[Sample]) -> int:
    """1 + the largest class id (255 excluded) found in the masks."""
    top = -1
    for sample in samples:
        mask = _sample_mask(sample)
        ids = np.unique(mask)
        ids = ids[ids != IGNORE_LABEL]
        if ids.size:
            top = max(top, int(ids[-1]))
    if top < 0:
        raise DatasetError("no labelled pixels in any mask (all 255?)")
    return max(2, top + 1)


def check_masks(samples: Sequence[Sample], n_classes: int) -> None:
    """Read every mask once and refuse unreadable ones and ids outside ``0..n_classes-1``
    (255 allowed) — before training starts rather than at the step that meets them."""
    for sample in samples:
        mask = _sample_mask(sample)
        _check_ids(sample, mask, n_classes)


def _check_ids(sample: Sample, mask: np.ndarray, n_classes: int) -> None:
    bad = (mask >= n_classes) & (mask != IGNORE_LABEL)
    if bad.any():
        values = sorted({int(v) for v in np.unique(mask[bad])})[:5]
        raise DatasetError(
            f"{sample.id}: mask {sample.mask.name} holds class id(s) {values} but the model "
            f"has {n_classes} classes (0..{n_classes - 1}; 255 = ignore)"
        )


def dataset_error(exc: Exception) -> DatasetError | None:
    """The DatasetError a tf.data pipeline raised inside ``tf.numpy_function``, recovered
    from the TensorFlow error that wraps it (None if it is not one)."""
    message = getattr(exc, "message", str(exc))
    marker = "DatasetError: "
    if marker not in message:
        return None
    return DatasetError(message.split(marker, 1)[1].splitlines()[0].strip())


def load_pair(sample: Sample, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8, mask uint8) with every mask value checked to be a class id or 255."""
    rgb, mask = read_sample(sample)
    _check_ids(sample, mask, n_classes)
    return rgb, mask


def _decoder(samples: Sequence[Sample], n_classes: int) -> Any:
    samples = list(samples)

    def decode(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return load_pair(samples[int(index)], n_classes)

    def op(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = tf.numpy_function(decode, [index], (tf.uint8, tf.uint8), stateful=False)
        image = tf.ensure_shape(image, [None, None, 3])
        label = tf.ensure_shape(label, [None, None])
        return image, label

    return op


# --- pure tensor functions -------------------------------------------------------------------
def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8/float pixels -> the network input ``(pixel - 128) / 128`` (float32)."""
    return (tf.cast(image, tf.float32) - _INPUT_ZERO) * _INPUT_SCALE


def augment_pair(
    image: tf.Tensor,
    label: tf.Tensor,
    crop_hw: tuple[int, int],
    augment: Augment,
    seed: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One DeepLab training augmentation of an (H, W, 3) image and its (H, W) label.

    Returns the normalised float32 crop (crop_h, crop_w, 3) and the uint8 label crop. All
    randomness is stateless from ``seed`` (shape [2] integers): same seed, same output.
    """
    crop_h, crop_w = int(crop_hw[0]), int(crop_hw[1])
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    choices = augment.scales()
    if choices is None:
        scale = tf.random.stateless_uniform(
            [], seeds[0], augment.min_scale, augment.max_scale, dtype=tf.float32
        )
    else:
        pick = tf.random.stateless_uniform([], seeds[0], 0, len(choices), dtype=tf.int32)
        scale = tf.gather(tf.constant(choices, tf.float32), pick)
    shape = tf.shape(label)
    new_h = tf.maximum(1, tf.cast(tf.round(tf.cast(shape[0], tf.float32) * scale), tf.int32))
    new_w = tf.maximum(1, tf.cast(tf.round(tf.cast(shape[1], tf.float32) * scale), tf.int32))
    size = tf.stack([new_h, new_w])
    img = tf.compat.v1.image.resize_bilinear(
        tf.cast(image, tf.float32)[None], size, align_corners=True
    )[0]
    lab = tf.compat.v1.image.resize_nearest_neighbor(label[None, :, :, None], size, align_corners=True)[
        0, :, :, 0
    ]
    pad_h = tf.maximum(crop_h - new_h, 0)
    pad_w = tf.maximum(crop_w - new_w, 0)
    img = tf.pad(img, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=PAD_PIXEL)
    lab = tf.pad(lab, [[0, pad_h], [0, pad_w]], constant_values=IGNORE_LABEL)
    full_h, full_w = new_h + pad_h, new_w + pad_w
    top = tf.random.stateless_uniform([], seeds[1], 0, full_h - crop_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], 0, full_w - crop_w + 1, dtype=tf.int32)
    img = img[top : top + crop_h, left : left + crop_w]
    lab = lab[top : top + crop_h, left : left + crop_w]
    if augment.flip:
        flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
        img = tf.cond(flip, lambda: img[:, ::-1], lambda: img)
        lab = tf.cond(flip, lambda: lab[:, ::-1], lambda: lab)
    img = tf.ensure_shape(normalize(img), [crop_h, crop_w, 3])
    lab = tf.ensure_shape(lab, [crop_h, crop_w])
    return img, lab


def letterbox_pair(
    image: tf.Tensor, label: tf.Tensor, size_hw: tuple[int, int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Evaluation geometry: scale to fit ``size_hw`` keeping the aspect ratio, place top-left,
    pad the rest with grey / 255 (ignored). This is segd's ``keep_aspect`` layout, so the
    validation score during training is the model at its real input size, never cropped."""
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    shape = tf.cast(tf.shape(label), tf.float32)
    scale = tf.minimum(out_h / shape[0], out_w / shape[1])
    new_h = tf.clip_by_value(tf.cast(tf.round(shape[0] * scale), tf.int32), 1, out_h)
    new_w = tf.clip_by_value(tf.cast(tf.round(shape[1] * scale), tf.int32), 1, out_w)
    size = tf.stack([new_h, new_w])
    img = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)
    lab = tf.image.resize(label[:, :, None], size, method="nearest")[:, :, 0]
    img = tf.pad(img, [[0, out_h - new_h], [0, out_w - new_w], [0, 0]], constant_values=PAD_PIXEL)
    lab = tf.pad(lab, [[0, out_h - new_h], [0, out_w - new_w]], constant_values=IGNORE_LABEL)
    return tf.ensure_shape(normalize(img), [out_h, out_w, 3]), tf.ensure_shape(lab, [out_h, out_w])


# --- datasets --------------------------------------------------------------------------------
def train_dataset(
    samples: Sequence[Sample],
    crop_hw: tuple[int, int],
    batch_size: int,
    *,
    n_classes: int,
    augment: Augment | None = None,
    seed: int = 0,
    start_step: int = 0,
) -> tf.data.Dataset:
    """Endless batches ``(float32 [B, h, w, 3], uint8 [B, h, w])`` of augmented crops.

    ``start_step`` skips that many batches on the (cheap) index stream, so a resumed run sees
    the batches an uninterrupted one would have.
    """
    if not samples:
        raise DatasetError("no training samples")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    augment = augment or Augment()
    n = len(samples)
    seed_t = tf.constant(int(seed), tf.int64)
    first = start_step * batch_size
    start_epoch, within = divmod(first, n)

    def epoch_indices(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([seed_t, epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).map(lambda i: (epoch, i))

    decode = _decoder(samples, n_classes)

    def load(epoch: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = decode(index)
        element_seed = tf.stack([seed_t, epoch * n + index])
        return augment_pair(image, label, crop_hw, augment, element_seed)

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_indices).skip(within)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)


def eval_dataset(
    samples: Sequence[Sample], size_hw: tuple[int, int], batch_size: int, *, n_classes: int
) -> tf.data.Dataset:
    """One pass of letterboxed ``(float32 image, uint8 label)`` batches (see
    :func:`letterbox_pair`), in sample order."""
    if not samples:
        raise DatasetError("no validation samples")
    decode = _decoder(samples, n_classes)

    def load(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = decode(index)
        return letterbox_pair(image, label, size_hw)

    ds = tf.data.Dataset.range(len(samples))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(2)
