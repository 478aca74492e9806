"""Labelled datasets, shared by ``segd eval`` and ``coral_deeplab``'s training: layouts,
samples, and masks read as class ids.

* PASCAL VOC layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG),
  ``ImageSets/Segmentation/<split>.txt`` listing ids. Any image suffix segd decodes is
  accepted for the image, so lossless copies (``.png``/``.bmp``) work too.
* A plain folder pair: ``images/<stem>.<any>`` and ``masks/<stem>.png`` (optional
  ``<split>.txt`` files next to the two folders select a split).

Mask pixels are class ids; :data:`IGNORE_LABEL` (255) marks "ignore" (VOC's object borders).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segd import png
from segd.errors import DatasetError, SegdError
from segd.labels import voc_palette
from segd.settings import DEFAULT_MAX_PIXELS

__all__ = [
    "IGNORE_LABEL",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "Sample",
    "dataset_layout",
    "find_samples",
    "folder_samples",
    "read_mask",
    "read_sample",
    "voc_samples",
]

#: Mask value that counts nowhere (VOC's object borders): not in the loss, not in the metrics.
IGNORE_LABEL = 255
#: Image files segd reads in a dataset or a calibration directory.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a JPEG mask is not class ids


# --- samples ---------------------------------------------------------------------------------
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
def _palette_png_indices(chunks: list[tuple[bytes, bytes]]) -> np.ndarray:
    """Palette indices of an indexed PNG, exactly, through OpenCV.

    OpenCV (libpng) always expands a palette to colours. Giving it the same file with the
    palette replaced by the grey ramp ``i -> (i, i, i)`` makes the expanded colour equal the
    index, so every PNG feature (bit depths 1-8, interlacing, all filters) is decoded by libpng
    and the original palette — which may repeat colours — never matters. Ancillary chunks are
    dropped (colour management must not touch the values, tRNS would add alpha).
    """
    rebuilt = [png.SIGNATURE]
    for kind, payload in chunks:
        if kind not in png.CRITICAL:
            continue
        if kind == b"PLTE":
            n = len(payload) // 3
            payload = np.repeat(np.arange(n, dtype=np.uint8), 3).tobytes()
        rebuilt.append(png.chunk(kind, payload))
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
    if data.startswith(png.SIGNATURE):
        try:
            chunks = png.read_chunks(data)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
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


