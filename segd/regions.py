"""Shaping a class mask for the JSON answer: keep some classes, drop small regions, and describe
each class as polygons (its outer contours) or as COCO run-length encoding.

Pure functions: arrays in, arrays / plain Python out. The RLE is the one of the COCO API
(pycocotools ``mask.encode``): runs over the mask in column-major order, starting with a run of
zeros, either as a list of integers ("uncompressed") or as COCO's compressed string.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from segd.errors import BadParameter
from segd.labels import Labels

__all__ = ["Shape", "keep_classes", "polygons", "rle", "rle_counts", "rle_string"]

UNLABELED = 255  # what removed pixels become when the label set has no background class
MAX_RUNS = 2_000_000  # RLE runs / polygon points in one answer (a smooth mask has far fewer)


@dataclass(frozen=True)
class Shape:
    """What a client asked of the answer besides the format (``POST /segment`` parameters)."""

    classes: tuple[str, ...] | None = None  # labels or ids to keep; others become background
    min_area: int = 0  # connected regions smaller than this (pixels) become background
    polygons: bool = False
    rle: str | None = None  # "compressed" | "uncompressed"

    @property
    def changes_mask(self) -> bool:
        return self.classes is not None or self.min_area > 1

    def resolve(self, labels: Labels) -> tuple[list[int] | None, int]:
        """Class ids to keep (None: all) and the id removed pixels get: the background class,
        else 255 (unlabeled). Unknown names are a 422 naming the model's classes."""
        fill = labels.background if labels.background is not None else UNLABELED
        if self.classes is None:
            return None, fill
        ids = []
        for item in self.classes:
            if item in labels.names:
                ids.append(labels.names.index(item))
            elif item.isdigit() and int(item) < len(labels):
                ids.append(int(item))
            else:
                raise BadParameter(f"classes: unknown class {item!r}; this model has: {', '.join(labels.names)}")
        return ids, fill

    def describe(
        self, document: dict[str, Any], mask: np.ndarray, keep: list[int] | None, fill: int, max_runs: int = MAX_RUNS
    ) -> None:
        """Keep only the asked classes in ``document["classes"]`` and add their polygons / RLE
        (at most ``max_runs`` points and runs in all: a BadParameter beyond)."""
        entries = document["classes"]
        if keep is not None:
            entries = [c for c in entries if c["id"] in keep]
        elif fill == UNLABELED:
            entries = [c for c in entries if c["id"] != UNLABELED]
        budget = max_runs
        for c in entries:
            if self.polygons:
                c["polygons"] = polygons(mask, c["id"], limit=budget)
                budget -= sum(len(p) for p in c["polygons"]) // 2
            if self.rle:
                c["rle"] = rle(mask, c["id"], compressed=self.rle == "compressed", limit=budget)
                budget -= len(c["rle"]["counts"])
            if budget < 0:
                raise BadParameter(f"the mask is too fragmented for polygons/RLE in JSON (over {max_runs} points or runs); ask for format=png")
        document["classes"] = entries


def keep_classes(mask: np.ndarray, keep: Iterable[int] | None, min_area: int, fill: int) -> np.ndarray:
    """A copy of ``mask`` where pixels of classes not in ``keep`` (None: all classes) and
    connected regions (8-connected) smaller than ``min_area`` pixels are set to ``fill``."""
    if keep is not None:
        lut = np.full(256, fill, dtype=np.uint8)
        ids = np.fromiter(keep, dtype=np.int64)
        lut[ids] = ids.astype(np.uint8)
        out = lut[mask]
    else:
        out = mask.copy()
    if min_area > 1:
        for cid in np.flatnonzero(np.bincount(out.ravel(), minlength=256)):  # classes present
            if cid == fill:
                continue
            binary = (out == cid).view(np.uint8)
            _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
            small = stats[:, cv2.CC_STAT_AREA] < min_area
            small[0] = False  # label 0: the pixels of other classes
            if small.any():
                out[small[labels]] = fill
    return out


def polygons(mask: np.ndarray, class_id: int, limit: int | None = None) -> list[list[int]]:
    """The outer contours of a class as COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` in pixel
    coordinates (holes are not subtracted: the RLE is exact). Vertices are the centres of the
    region's edge pixels (OpenCV's contours), so a rasterizer that fills the polygon's area
    (COCO's) covers half a pixel less at each edge. Contours of fewer than 3 points
    (single pixels, one-pixel lines) are left out, as COCO's polygon format needs an area."""
    binary = (mask == class_id).view(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if limit is not None and sum(len(c) for c in contours) > limit:  # checked before the Python lists
        raise BadParameter(f"the mask is too fragmented for polygons in JSON (over {limit} points); ask for format=png")
    return [c.reshape(-1).tolist() for c in contours if len(c) >= 3]


def rle_counts(binary: np.ndarray, limit: int | None = None) -> list[int]:
    """COCO run lengths of a boolean H x W array: column-major, the first run counts zeros.
    More than ``limit`` runs is a :class:`BadParameter` (checked before building the list)."""
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if limit is not None and change.size >= limit:
        raise BadParameter(f"the mask is too fragmented for RLE in JSON (over {limit} runs); ask for format=png")
    runs = np.diff(np.concatenate(([0], change, [flat.size])))
    counts = runs.tolist()
    return [0, *counts] if flat[0] else counts


def rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE string (pycocotools ``rleToString``): each count, minus the count
    two before it from the third on, in 5-bit groups with a continuation bit, as chars 48+."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle(mask: np.ndarray, class_id: int, compressed: bool = True, limit: int | None = None) -> dict[str, Any]:
    """``{"size": [h, w], "counts": ...}`` of one class, as pycocotools reads it."""
    counts = rle_counts(mask == class_id, limit)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": rle_string(counts) if compressed else counts}
