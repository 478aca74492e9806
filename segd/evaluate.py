"""Evaluate any segmentation variant on a labelled dataset: mIoU, per-class IoU, pixel accuracy.

TensorFlow-free on purpose (docs/ARCHITECTURE.md, invariant 1): ``segd eval`` runs where the daemon runs, on a Pi
too, and scores exactly what segd serves — the engine's mask at the original image size
(a local variant or ``.tflite`` file), or the mask a running daemon returns over HTTP.

Datasets (shared with :mod:`coral_deeplab.data`, which trains on the same layouts):

* PASCAL VOC layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG),
  ``ImageSets/Segmentation/<split>.txt`` listing ids. Any image suffix segd decodes is
  accepted for the image, so lossless copies (``.png``/``.bmp``) work too.
* A plain folder pair: ``images/<stem>.<any>`` and ``masks/<stem>.png`` (optional
  ``<split>.txt`` files next to the two folders select a split).

Mask pixels are class ids; 255 marks "ignore" (VOC's object borders) and counts nowhere.

The metric is the standard one (PASCAL VOC, DeepLab): one confusion matrix summed over all
pixels of all images, then ``IoU_c = TP / (TP + FP + FN)`` per class and mIoU = the mean over
classes that occur at all (in truth or prediction); a class with an empty union has no IoU
(NaN), rather than a misleading 0 or 1.
"""

from __future__ import annotations

import csv
import io
import json
import math
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segd.errors import BadParameter, DatasetError, ModelError, RuntimeUnavailable, SegdError
from segd.labels import Labels, voc_palette
from segd.settings import DEFAULT_MAX_PIXELS, Settings

__all__ = [
    "IGNORE_LABEL",
    "IMAGE_SUFFIXES",
    "EvalResult",
    "HttpPredictor",
    "Sample",
    "confusion_csv",
    "confusion_matrix",
    "dataset_layout",
    "evaluate",
    "find_samples",
    "folder_samples",
    "iou_chart",
    "iou_per_class",
    "mean_iou",
    "open_local",
    "pixel_accuracy",
    "read_mask",
    "read_sample",
    "segmenter_for_file",
    "voc_samples",
    "write_report",
]

IGNORE_LABEL = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a JPEG mask is not class ids
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")

Predictor = Callable[[bytes], np.ndarray]
ProgressFn = Callable[[int, int], None]


# --- datasets --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One labelled image: an id (file stem) and the two files."""

    id: str
    image: Path
    mask: Path


def dataset_layout(root: str | Path) -> str:
    """``"voc"`` or ``"folder"``; DatasetError if ``root`` is neither layout."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist")
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    raise DatasetError(
        f"{root} is not a dataset segd reads: expected the PASCAL VOC layout (JPEGImages/, "
        "SegmentationClass/, ImageSets/Segmentation/<split>.txt) or a folder pair images/ + "
        "masks/ with same-named PNG masks"
    )


def _find_with_suffix(directory: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        for candidate in (directory / f"{stem}{suffix}", directory / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read split file {path}: {exc.strerror}") from exc
    ids = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise DatasetError(f"split file {path} lists no image ids")
    return ids


def _samples_for_ids(
    ids: Sequence[str], image_dir: Path, mask_dir: Path, where: str
) -> list[Sample]:
    out, missing = [], []
    for sid in ids:
        image = _find_with_suffix(image_dir, sid, IMAGE_SUFFIXES)
        mask = _find_with_suffix(mask_dir, sid, MASK_SUFFIXES)
        if image is None or mask is None:
            missing.append(f"{sid} ({'image' if image is None else 'mask'})")
            continue
        out.append(Sample(sid, image, mask))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"{where}: missing files for {len(missing)} id(s): {shown}")
    return out


def voc_samples(root: str | Path, split: str = "val") -> list[Sample]:
    """Samples of a PASCAL VOC layout split (``ImageSets/Segmentation/<split>.txt``)."""
    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"no split file {split_file} (VOC layout lists ids per split there)")
    ids = _read_ids(split_file)
    return _samples_for_ids(ids, root / "JPEGImages", root / "SegmentationClass", str(split_file))


def folder_samples(root: str | Path, split: str | None = None) -> list[Sample]:
    """Samples of a folder pair ``images/`` + ``masks/`` (all, or those in ``<split>.txt``).

    Every image must have a mask with the same stem: an unlabelled image in a training folder
    is more likely a mistake than an intention, so it is reported instead of skipped.
    """
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    if split is not None:
        split_file = root / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"no split file {split_file} for split {split!r}")
        return _samples_for_ids(_read_ids(split_file), image_dir, mask_dir, str(split_file))
    stems = sorted(
        p.stem for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not stems:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return _samples_for_ids(stems, image_dir, mask_dir, str(root))


def find_samples(root: str | Path, split: str | None = None) -> list[Sample]:
    """Samples of either layout. ``split=None``: VOC's ``val``; a folder pair's every image."""
    if dataset_layout(root) == "voc":
        return voc_samples(root, split or "val")
    return folder_samples(root, split)


# --- masks -----------------------------------------------------------------------------------
def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            raise DatasetError(f"PNG chunk {kind!r} runs past the end of the file (truncated)")
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
        if kind == b"IEND":
            return chunks
    raise DatasetError("PNG has no IEND chunk (truncated)")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _palette_png_indices(chunks: list[tuple[bytes, bytes]]) -> np.ndarray:
    """Palette indices of an indexed PNG, exactly, through OpenCV.

    OpenCV (libpng) always expands a palette to colours. Giving it the same file with the
    palette replaced by the grey ramp ``i -> (i, i, i)`` makes the expanded colour equal the
    index, so every PNG feature (bit depths 1-8, interlacing, all filters) is decoded by libpng
    and the original palette — which may repeat colours — never matters. Ancillary chunks are
    dropped (colour management must not touch the values, tRNS would add alpha).
    """
    rebuilt = [_PNG_SIGNATURE]
    for kind, payload in chunks:
        if kind not in _PNG_CRITICAL:
            continue
        if kind == b"PLTE":
            n = len(payload) // 3
            payload = np.repeat(np.arange(n, dtype=np.uint8), 3).tobytes()
        rebuilt.append(_chunk(kind, payload))
    buf = np.frombuffer(b"".join(rebuilt), dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError("indexed PNG could not be decoded (corrupt image data)")
    return np.ascontiguousarray(bgr[:, :, 0])


def _voc_greys() -> frozenset[int]:
    pal = voc_palette(256)
    return frozenset(int(c[0]) for c in pal if c[0] == c[1] == c[2])


#: Grey levels v whose colour (v, v, v) is in the VOC colour map: {0, 64, 128, 192}.
_VOC_GREYS = _voc_greys()


def _colours_to_ids(rgb: np.ndarray) -> np.ndarray:
    """Map an RGB colour mask to class ids through the PASCAL VOC colour map (the colours
    VOC masks and segd's own PNGs use; the map gives 256 distinct colours)."""
    pal = voc_palette(256).astype(np.int64)
    keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    px = rgb.astype(np.int64)
    pixel_keys = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    pos = np.clip(np.searchsorted(sorted_keys, pixel_keys), 0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == pixel_keys
    if not found.all():
        bad = np.unique(pixel_keys[~found])[:5]
        shown = ", ".join(f"({k >> 16}, {(k >> 8) & 255}, {k & 255})" for k in bad)
        raise DatasetError(
            f"colour mask holds colours outside the VOC colour map, e.g. {shown}; save masks as "
            "indexed (palette) or greyscale PNGs whose pixel values are class ids"
        )
    return order[pos].astype(np.uint8)


def read_mask(data: bytes) -> np.ndarray:
    """Class-id mask (H x W uint8) from mask file bytes.

    Indexed PNGs give their palette indices (VOC ``SegmentationClass``, segd's own masks);
    greyscale images give their values (8-bit, or 16-bit with values <= 255); colour images
    are mapped back through the VOC colour map. A colour image whose channels are all equal is
    ambiguous — VOC colours 0, 7, 56 and 63 are greys (0, 128, 64 and 192) — and is read
    through the VOC map when every grey in it is one of those, as grey ids otherwise.
    DatasetError for anything else.
    """
    if data.startswith(_PNG_SIGNATURE):
        chunks = _png_chunks(data)
        if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
            raise DatasetError("PNG does not start with a valid IHDR chunk")
        if chunks[0][1][9] == 3:  # colour type 3: indexed
            return _palette_png_indices(chunks)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise DatasetError(f"mask could not be decoded: {exc}") from exc
    if img is None:
        raise DatasetError("mask is not an image OpenCV decodes (PNG, BMP or TIFF expected)")
    if img.ndim == 3:
        img = img[:, :, :3]
        if np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 0], img[:, :, 2]):
            grey = img[:, :, 0]
            if img.dtype == np.uint8 and set(np.unique(grey).tolist()) <= _VOC_GREYS:
                # Every pixel is also a VOC colour ((128,128,128) is class 7): a VOC colour mask.
                return _colours_to_ids(np.ascontiguousarray(img[:, :, ::-1]))
            img = grey
        elif img.dtype == np.uint8:
            return _colours_to_ids(np.ascontiguousarray(img[:, :, ::-1]))
        else:
            raise DatasetError(f"{img.dtype} colour masks are not supported")
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.integer) or img.size == 0 or int(img.max()) > 255:
            raise DatasetError(f"{img.dtype} mask with values above 255 cannot hold class ids")
        img = img.astype(np.uint8)
    return np.ascontiguousarray(img)


def read_sample(sample: Sample, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, uint8 mask) of a sample, decoded as the segd engine decodes images
    (EXIF orientation applied); DatasetError when unreadable or the sizes differ."""
    from segd.preprocess import decode_image

    try:
        rgb = decode_image(sample.image.read_bytes(), max_pixels=max_pixels).rgb
        mask = read_mask(sample.mask.read_bytes())
    except OSError as exc:
        raise DatasetError(f"{sample.id}: cannot read {exc.filename}: {exc.strerror}") from exc
    except SegdError as exc:
        raise DatasetError(f"{sample.id}: {exc.detail}") from exc
    if rgb.shape[:2] != mask.shape:
        raise DatasetError(
            f"{sample.id}: image {sample.image.name} is {rgb.shape[1]}x{rgb.shape[0]} but mask "
            f"{sample.mask.name} is {mask.shape[1]}x{mask.shape[0]} (an EXIF rotation on the "
            "image? masks must match the image as displayed)"
        )
    return rgb, mask


# --- metric ----------------------------------------------------------------------------------
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


@dataclass
class EvalResult:
    """Summed confusion matrix of a run plus what it was measured on."""

    confusion: np.ndarray
    names: tuple[str, ...]
    n_images: int
    model: str = ""

    @property
    def iou(self) -> np.ndarray:
        return iou_per_class(self.confusion)

    @property
    def miou(self) -> float:
        return mean_iou(self.confusion)

    @property
    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.confusion)

    def to_dict(self) -> dict[str, Any]:
        iou = self.iou
        return {
            "model": self.model,
            "images": self.n_images,
            "pixels": int(self.confusion.sum()),
            "miou": _num(self.miou),
            "pixel_accuracy": _num(self.pixel_accuracy),
            "classes": [
                {
                    "id": i,
                    "name": n,
                    "iou": _num(float(iou[i])),
                    "pixels": int(self.confusion[i].sum()),
                }
                for i, n in enumerate(self.names)
            ],
        }

    def format_table(self) -> str:
        iou = self.iou
        width = max(8, *(len(n) for n in self.names))
        lines = [f"{'class':{width}}  {'IoU':>7}  {'pixels':>12}"]
        for i, name in enumerate(self.names):
            value = "    n/a" if math.isnan(iou[i]) else f"{iou[i]:7.4f}"
            lines.append(f"{name:{width}}  {value}  {int(self.confusion[i].sum()):12d}")
        lines.append(f"{'mIoU':{width}}  {self.miou:7.4f}")
        lines.append(f"{'pixel acc':{width}}  {self.pixel_accuracy:7.4f}")
        return "\n".join(lines)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def evaluate(
    samples: Sequence[Sample],
    predict: Predictor,
    names: Sequence[str],
    *,
    model: str = "",
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Run ``predict(image bytes) -> mask at the original size`` over the samples and sum the
    confusion matrix over ``len(names)`` classes."""
    n = len(names)
    cm = np.zeros((n, n), dtype=np.int64)
    for done, sample in enumerate(samples, 1):
        try:
            truth = read_mask(sample.mask.read_bytes())
            data = sample.image.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{sample.id}: cannot read {exc.filename}: {exc.strerror}") from exc
        except DatasetError as exc:
            raise DatasetError(f"{sample.id}: {sample.mask.name}: {exc.detail}") from exc
        pred = predict(data)
        if pred.shape != truth.shape:
            raise DatasetError(
                f"{sample.id}: mask {sample.mask.name} is {truth.shape[1]}x{truth.shape[0]} but "
                f"the model's mask of {sample.image.name} is {pred.shape[1]}x{pred.shape[0]}"
            )
        try:
            cm += confusion_matrix(truth, pred, n)
        except ValueError as exc:
            raise DatasetError(f"{sample.id}: {exc} (the model has {n} classes)") from exc
        if progress is not None:
            progress(done, len(samples))
    return EvalResult(cm, tuple(names), len(samples), model)


# --- predictors ------------------------------------------------------------------------------
def open_local(
    model: str,
    *,
    models_dir: Path | None = None,
    accelerator: str = "auto",
    device: str | None = None,
    runtime: str | None = None,
    num_threads: int | None = None,
    mirror: str | None = None,
) -> Any:
    """A :class:`segd.engine.Segmenter` for a variant name or a ``.tflite`` file.

    A name is a manifest variant. A file that a manifest describes (a published model with its
    ``<name>.toml`` beside it, or one of the manifest's files by sha256, e.g. Google's) runs as
    that variant, through :func:`segd.resolve.open_segmenter`. Any other file is
    described from its own tensors (see :func:`segmenter_for_file`).
    """
    from segd.engine import Segmenter
    from segd.variants import load_manifest

    manifest = load_manifest(models_dir=models_dir)
    path = Path(model)
    if model in manifest.variants or not (path.suffix == ".tflite" or path.is_file()):
        return Segmenter.open(
            manifest.get(model), models_dir=models_dir, accelerator=accelerator, device=device,
            runtime=runtime, num_threads=num_threads, mirror=mirror,
        )  # fmt: skip
    from segd.errors import UnknownModel
    from segd.resolve import open_segmenter

    try:
        return open_segmenter(
            path, models_dir=models_dir, mirror=mirror, device=device, accelerator=accelerator,
            runtime=runtime, num_threads=num_threads,
        )  # fmt: skip
    except UnknownModel:
        return segmenter_for_file(path, runtime=runtime, num_threads=num_threads)


def segmenter_for_file(
    path: Path, *, runtime: str | None = None, num_threads: int | None = None
) -> Any:
    """A CPU Segmenter for a ``.tflite`` no manifest describes, described from its tensors.

    Assumed, as for every coral_deeplab and Coral DeepLab file: raw RGB input bytes (mean =
    std = 128); a resize/argmax tail is stripped when present; the logits grid is DeepLab's
    align-corners grid, checked by :func:`segd.geometry.output_geometry` (16k+1
    input sides such as 513, ``H - 1 = stride (h - 1)`` on both axes — an even input side is
    refused, as its logit positions cannot be told from the shapes); classes are named
    ``class_<i>``. A model that outputs only a class map cannot say its number of classes and
    is refused.
    """
    from segd.engine import Segmenter, Selection, strip_model_tail
    from segd.runtime import open_cpu
    from segd.variants import FileSpec, InputSpec, OutputSpec, Variant, sha256_bytes

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    if b"edgetpu-custom-op" in data:
        raise ModelError(
            f"{path} is compiled for the Edge TPU and no manifest describes it; evaluate its "
            "published variant by name, or its CPU twin"
        )
    strip = True
    try:
        body = strip_model_tail(data)
    except ModelError:
        body, strip = data, False
    runner = open_cpu(body, runtime=runtime, num_threads=num_threads)
    inp, out = runner.input, runner.output
    if len(inp.shape) != 4 or inp.shape[3] != 3 or len(out.shape) != 4:
        runner.close()
        raise ModelError(
            f"{path}: tensors {list(inp.shape)} -> {list(out.shape)} are not [1, H, W, 3] -> "
            "[1, h, w, classes] logits (a class-map output does not say how many classes "
            "there are: publish the model with its labels and evaluate it by name)"
        )
    from segd.geometry import output_geometry

    try:
        stride, aligned = output_geometry(inp.shape[1:3], out.shape[1:3])
    except ValueError as exc:
        runner.close()
        raise ModelError(
            f"{path}: cannot tell how its logits map onto the input ({exc}); describe it in a "
            "<name>.toml manifest (output.stride, output.align_corners) and evaluate it by name"
        ) from None
    n_classes = out.shape[3]
    output = OutputSpec("logits", out.shape, out.dtype.name, stride, aligned, strip)
    spec = FileSpec(name=path.name, sha256=sha256_bytes(data), size=len(data))
    variant = Variant(
        name=path.stem,
        description=f"{path.name} (described from its tensors)",
        labels=Labels(tuple(f"class_{i}" for i in range(n_classes)), voc_palette(256)),
        input=InputSpec(inp.shape, inp.dtype.name),
        output=output,
        cpu=spec,
    )
    return Segmenter(variant, runner, Selection("cpu", spec, path, "described from its tensors"))


class HttpPredictor:
    """Masks from a running segd daemon: ``POST /segment?format=png`` with the raw image.

    The labels (and so the number of classes) come from ``GET /models/<name>``.
    """

    def __init__(
        self, url: str, model: str | None = None, *, api_key: str | None = None,
        keep_aspect: bool = False, timeout: float = 120.0,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.keep_aspect = keep_aspect
        self.timeout = timeout
        if model is None:
            model = str(self._json("/models")["default"])
        self.model = model
        info = self._json(f"/models/{urllib.parse.quote(model, safe='')}")
        self.names: tuple[str, ...] = tuple(str(n) for n in info["labels"])

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        headers = {"User-Agent": "segd-eval"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                doc = json.loads(detail)
                detail = f"{doc['error']}: {doc['detail']}"
            except (ValueError, KeyError, TypeError):
                pass
            error = BadParameter if 400 <= exc.code < 500 else RuntimeUnavailable
            raise error(f"{self.url}{path}: HTTP {exc.code} {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeUnavailable(f"cannot reach segd at {self.url}: {reason}") from exc

    def _json(self, path: str) -> dict[str, Any]:
        doc = json.loads(self._request(path))
        if not isinstance(doc, dict):
            raise RuntimeUnavailable(f"{self.url}{path}: unexpected answer {doc!r}")
        return doc

    def __call__(self, data: bytes) -> np.ndarray:
        query = urllib.parse.urlencode(
            {"model": self.model, "format": "png", "keep_aspect": str(self.keep_aspect).lower()}
        )
        body = self._request(f"/segment?{query}", data)
        try:
            return read_mask(body)
        except DatasetError as exc:
            raise RuntimeUnavailable(f"segd at {self.url} sent an unreadable mask: {exc}") from exc


# --- reports ---------------------------------------------------------------------------------
def confusion_csv(cm: np.ndarray, names: Sequence[str]) -> str:
    """CSV: header ``truth \\ prediction, <names>``, one row per true class, pixel counts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["truth \\ prediction", *names])
    for name, row in zip(names, np.asarray(cm), strict=True):
        writer.writerow([name, *(int(x) for x in row)])
    return out.getvalue()


def iou_chart(
    iou: np.ndarray, names: Sequence[str], *, title: str = "", palette: np.ndarray | None = None
) -> np.ndarray:
    """Horizontal bar chart of per-class IoU as a BGR image (OpenCV only, no matplotlib).

    One bar per class in its palette colour with the value printed, a dashed line at the
    mIoU, "n/a" for classes that never occur.
    """
    iou = np.asarray(iou, dtype=np.float64)
    pal = voc_palette(256) if palette is None else np.asarray(palette, dtype=np.uint8)
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    row, pad, bar_w = 22, 10, 420
    label_w = max(cv2.getTextSize(n, font, scale, thick)[0][0] for n in [*names, "mIoU"]) + 2 * pad
    top = 40
    width = label_w + bar_w + 80
    height = top + row * len(names) + 40
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    finite = iou[np.isfinite(iou)]
    miou = float(finite.mean()) if finite.size else math.nan
    heading = f"{title}  mIoU {miou:.4f}" if title else f"mIoU {miou:.4f}"
    cv2.putText(img, heading, (pad, 25), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    x0 = label_w
    for i, name in enumerate(names):
        y = top + i * row
        (tw, th), _ = cv2.getTextSize(name, font, scale, thick)
        cv2.putText(img, name, (x0 - pad - tw, y + row // 2 + th // 2), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
        value = iou[i]
        if math.isnan(value):
            cv2.putText(img, "n/a", (x0 + 4, y + row // 2 + th // 2), font, scale, (128, 128, 128), thick, cv2.LINE_AA)
            continue
        x1 = x0 + round(bar_w * float(np.clip(value, 0, 1)))
        r, g, b = (int(c) for c in pal[i % len(pal)])
        if x1 > x0:
            cv2.rectangle(img, (x0, y + 3), (x1, y + row - 3), (b, g, r), cv2.FILLED)
        cv2.rectangle(img, (x0, y + 3), (max(x1, x0 + 1), y + row - 3), (60, 60, 60), 1)
        cv2.putText(img, f"{value:.3f}", (x1 + 5, y + row // 2 + th // 2), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    axis_y = top + row * len(names) + 4
    cv2.line(img, (x0, top - 2), (x0, axis_y), (0, 0, 0), 1)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + round(bar_w * tick)
        cv2.line(img, (x, axis_y), (x, axis_y + 4), (0, 0, 0), 1)
        cv2.putText(img, f"{tick:g}", (x - 8, axis_y + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if math.isfinite(miou):
        x = x0 + round(bar_w * miou)
        for yy in range(top - 2, axis_y, 8):
            cv2.line(img, (x, yy), (x, min(yy + 4, axis_y)), (0, 0, 200), 1)
    return img


def write_report(
    result: EvalResult, out_dir: str | Path, *, palette: np.ndarray | None = None
) -> dict[str, Path]:
    """Write ``confusion.csv``, ``iou.png`` and ``metrics.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "confusion.csv", "chart": out / "iou.png", "json": out / "metrics.json"}
    paths["csv"].write_text(confusion_csv(result.confusion, result.names))
    chart = iou_chart(result.iou, result.names, title=result.model, palette=palette)
    ok, png = cv2.imencode(".png", chart)
    if not ok:
        raise OSError("OpenCV could not encode the chart as PNG")
    paths["chart"].write_bytes(png.tobytes())
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return paths


# --- command line (``segd eval``) ------------------------------------------------------------
def run_cli(args: Any, settings: Settings) -> int:
    """``segd eval``: evaluate a local variant/file or a daemon (``--url``) on ``--data``."""
    samples = find_samples(args.data, args.split)
    if args.limit:
        samples = samples[: args.limit]
    palette: np.ndarray | None = None
    if args.url:
        api_key = args.api_key
        if api_key is None and args.api_key_file is not None:
            try:
                api_key = args.api_key_file.read_text().strip()
            except OSError as exc:
                raise BadParameter(f"cannot read {args.api_key_file}: {exc.strerror}") from exc
        remote = HttpPredictor(args.url, args.model, api_key=api_key, keep_aspect=args.keep_aspect)
        predict: Predictor = remote
        names, model_name = remote.names, remote.model
    else:
        if not args.model:
            raise BadParameter("--model NAME|FILE is required without --url")
        seg = open_local(
            args.model, models_dir=settings.models_dir, accelerator=settings.accelerator,
            device=settings.device, runtime=settings.runtime, num_threads=settings.threads,
            mirror=settings.mirror,
        )  # fmt: skip

        def predict(data: bytes) -> np.ndarray:
            return np.asarray(seg.segment(data, keep_aspect=args.keep_aspect).mask)

        names, model_name = seg.variant.labels.names, seg.variant.name
        palette = seg.variant.labels.palette
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            sys.stderr.write(f"\r{model_name}: {done}/{total} images")
            sys.stderr.flush()

    result = evaluate(samples, predict, names, model=model_name, progress=progress)
    if tty:
        sys.stderr.write("\n")
    out_dir = args.out or Path(f"eval-{Path(model_name).name}")
    paths = write_report(result, out_dir, palette=palette)
    if args.json:
        print(json.dumps({**result.to_dict(), "files": {k: str(v) for k, v in paths.items()}}, indent=2))
    else:
        print(f"{model_name} on {len(samples)} image(s) of {args.data}")
        print(result.format_table())
        print(f"wrote {paths['csv']}, {paths['chart']}, {paths['json']}")
    return 0
