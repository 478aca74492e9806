"""Class names and colour palettes of a model's label set.

The manifest (``models/variants.toml``, ``[labels.*]``) is data; this module turns a table into
a :class:`Labels`: ``Labels(names=table["names"], palette=palette_from(table["palette"]))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segd.errors import BadParameter, ModelError

__all__ = ["Labels", "palette_from", "voc_palette"]


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, (n, 3) uint8.

    Class id bits are dealt round-robin to R, G, B from the most significant colour bit down:
    bit 3k of the id -> bit 7-k of R, 3k+1 -> G, 3k+2 -> B (so 1 = dark red, 2 = dark green,
    15 = person (192, 128, 128), 255 = void (224, 224, 192)). Every id gets a distinct colour.
    """
    if not 0 <= n <= 256:
        raise BadParameter(f"the VOC palette has 256 entries, cannot make {n}")
    ids = np.arange(n, dtype=np.int64)
    pal = np.zeros((n, 3), dtype=np.int64)
    for k in range(8):  # id bits 3k, 3k+1, 3k+2 -> colour bit 7-k
        for c in range(3):
            pal[:, c] |= ((ids >> (3 * k + c)) & 1) << (7 - k)
    return pal.astype(np.uint8)


def palette_from(spec: str | Sequence[Sequence[int]]) -> np.ndarray:
    """A 256-entry palette from a manifest value: ``"voc"`` or a list of [R, G, B] triples.

    A list gives the colours of ids 0..len-1; the remaining ids up to 255 get the VOC colours so
    that any id a mask can hold has a defined colour. Raises :class:`ModelError` for a malformed
    spec (it comes from the manifest).
    """
    if isinstance(spec, str):
        if spec.lower() != "voc":
            raise ModelError(f"unknown palette name {spec!r} (use 'voc' or a list of RGB triples)")
        return voc_palette(256)
    try:
        arr = np.asarray(spec)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"palette must be a list of [R, G, B] triples: {exc}") from exc
    if arr.size == 0:
        arr = arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise ModelError(
            f"palette must be a list of [R, G, B] integer triples, got shape {arr.shape}"
        )
    if arr.shape[0] > 256:
        raise ModelError(f"palette has {arr.shape[0]} entries; at most 256 fit an 8-bit mask")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ModelError("palette colour values must be within 0..255")
    pal = voc_palette(256)
    pal[: arr.shape[0]] = arr.astype(np.uint8)
    return pal


@dataclass(frozen=True, eq=False)
class Labels:
    """Class names (index = class id) and a palette with at least one colour per class."""

    names: tuple[str, ...]
    palette: np.ndarray  # (N, 3) uint8, N >= len(names); read-only

    def __post_init__(self) -> None:
        names = tuple(str(x) for x in self.names)
        pal = np.array(self.palette, dtype=np.uint8, copy=True)
        if pal.ndim != 2 or pal.shape[1] != 3:
            raise ModelError(f"palette must have shape (N, 3), not {pal.shape}")
        if not names:
            raise ModelError("a label set needs at least one class name")
        if pal.shape[0] < len(names):
            raise ModelError(f"palette has {pal.shape[0]} colours for {len(names)} classes")
        if pal.shape[0] > 256:
            raise ModelError(f"palette has {pal.shape[0]} colours; at most 256 fit an 8-bit mask")
        pal.setflags(write=False)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "palette", pal)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def background(self) -> int | None:
        """The id of the class named "background", if the label set has one: an overlay leaves
        only it untinted (Cityscapes has none: its class 0 is road)."""
        lowered = [n.lower() for n in self.names]
        return lowered.index("background") if "background" in lowered else None

    def name(self, class_id: int) -> str:
        """Name of a class id; ids past the names (should not happen) get ``class_<id>``."""
        return self.names[class_id] if 0 <= class_id < len(self.names) else f"class_{class_id}"

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> Labels:
        """Build from a manifest ``[labels.NAME]`` table (keys ``names`` and ``palette``)."""
        names = table.get("names") if isinstance(table, dict) else None
        if not isinstance(names, list) or not names:
            raise ModelError("'names' must be a non-empty list")
        return cls(names=tuple(str(n) for n in names), palette=palette_from(table.get("palette", "voc")))
