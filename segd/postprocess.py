"""Logits -> class mask at the original image size, exactly and fast. Pure numpy, no I/O.

DeepLab models end in low-resolution logits (e.g. 33x33x21). The mask the user wants is the
argmax of those logits bilinearly upsampled to the *original* image (anything from 1x1 to
4000x3000). Doing that naively materialises H x W x C floats; here only the pixels whose
answer is actually in doubt are computed.

Why the shortcut is exact (docs/ARCHITECTURE.md, invariant 2: identical to the float64 reference). Every output
value is computed as ``((v00*wx0 + v01*wx1)*wy0 + (v10*wx0 + v11*wx1)*wy1)`` with weights
``>= 0``, and each IEEE multiply by a non-negative weight and each add is monotone. So if
class k is >= class j at all four corners of a cell, the interpolated k is >= j too. If k is
strictly greater at every corner, it stays strictly greater: the corners differ by at least
2**-25 of their magnitude (float16/float32 values, or quantized integers times a normal
scale) while float64 rounding moves the four-term sums by at most ~4 * 2**-53 of it. Hence:

* a cell whose four corners share the argmax label gives that label to every pixel in it;
* in the other cells a class whose corner maximum is below the best corner minimum of
  another class is strictly dominated everywhere and cannot win, so only the survivors are
  interpolated, with the very same float64 operations in the same order as the reference.

Inputs for which that argument does not hold are refused rather than approximated:
non-finite float logits (:class:`segd.errors.ModelError`), float64 logits, and
quantization scales outside the normal float32 range.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from segd.errors import ModelError

__all__ = [
    "AxisMap",
    "AxisSamples",
    "SampleGrid",
    "class_pixel_counts",
    "nearest_resize_labels",
    "upsample_argmax",
    "upsample_argmax_reference",
]

_INT_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int16))
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_MAX_CLASSES = 256
_MIN_SCALE = 2.0**-126  # smallest normal float32: keeps every product far from underflow
_MAX_SCALE = 2.0**127
_MAX_ZERO_POINT = 2**16

# Pixels computed per batch of boundary cells in the fast path: keeps the float64
# temporaries (a few of these many elements) inside the CPU caches.
_BATCH_PIXELS = 1 << 15


# --- geometry ----------------------------------------------------------------------------
class AxisSamples(NamedTuple):
    """Where each output pixel of one axis samples the logit grid: the two neighbouring
    logit indices and their weights (``w0 = 1 - w1``), as both implementations use them."""

    i0: np.ndarray  # intp, floor of the clamped source coordinate
    i1: np.ndarray  # intp, min(i0 + 1, n_src - 1)
    w0: np.ndarray  # float64, weight of i0
    w1: np.ndarray  # float64, weight of i1


def _frac(x: float | int | Fraction, what: str) -> Fraction:
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{what} must be a number, not bool")
    f = float(x)
    if not np.isfinite(f):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return x if isinstance(x, Fraction) else Fraction(x)


def _size(x: int, what: str) -> int:
    if isinstance(x, (bool, np.bool_)) or int(x) != x or int(x) < 1:
        raise ValueError(f"{what} must be a positive integer, got {x!r}")
    return int(x)


@dataclass(frozen=True)
class AxisMap:
    """One axis of the sampling geometry: output pixel ``dst`` reads the logit grid at
    ``src = scale * dst + offset`` (float64), clamped to ``[0, n_src - 1]`` and sampled
    bilinearly between ``floor(src)`` and the next cell."""

    n_src: int
    n_dst: int
    scale: float
    offset: float

    def __post_init__(self) -> None:
        _size(self.n_src, "n_src")
        _size(self.n_dst, "n_dst")
        if not (np.isfinite(self.scale) and np.isfinite(self.offset)) or self.scale < 0:
            raise ValueError(f"bad axis map scale={self.scale!r} offset={self.offset!r}")

    @classmethod
    def for_model(
        cls,
        *,
        n_logits: int,
        n_input: int,
        start: float = 0,
        size: float | None = None,
        n_out: int,
        align_corners: bool,
    ) -> AxisMap:
        """Compose output pixel -> model-input coordinate -> logit coordinate.

        The logits relate to the model input as TF's ``resize_bilinear`` from logits to
        input size would map them (the model's convention):

        * ``align_corners=True``: logit = inp * (n-1)/(N-1)
        * ``align_corners=False`` (half-pixel centres): logit = (inp + 0.5) * n/N - 0.5

        The output image relates to its content box ``[start, start + size)`` in the model
        input as the inverse of the resize that put it there (OpenCV's, which uses pixel
        centres whatever the model's convention): inp = start + (y + 0.5) * size/M - 0.5.

        (n logits, N input, M output pixels). A size-1 logit or input side has scale 0 (its
        single pixel sits at the corner, as TF does). The composition is done in exact
        rational arithmetic and rounded once, so without padding and with M == N it is TF's
        resize_bilinear from logits to input size.
        """
        n = _size(n_logits, "n_logits")
        big_n = _size(n_input, "n_input")
        m = _size(n_out, "n_out")
        t = _frac(start, "content start")
        c = _frac(big_n if size is None else size, "content size")
        if c <= 0 or t < 0 or t + c > big_n:
            raise ValueError(
                f"content box [{float(t)}, {float(t + c)}) must be non-empty and inside the "
                f"model input [0, {big_n})"
            )
        half = Fraction(1, 2)
        if align_corners:
            s1 = Fraction(n - 1, big_n - 1) if big_n > 1 else Fraction(0)
            b1 = Fraction(0)
        else:
            s1 = Fraction(n, big_n)
            b1 = s1 * half - half
        s2 = c / m
        b2 = t + s2 * half - half
        return cls(n_src=n, n_dst=m, scale=float(s1 * s2), offset=float(s1 * b2 + b1))

    def coords(self) -> np.ndarray:
        """Clamped float64 source coordinate of every output pixel."""
        src = np.arange(self.n_dst, dtype=np.float64) * self.scale + self.offset
        return np.clip(src, 0.0, float(self.n_src - 1), out=src)

    def samples(self) -> AxisSamples:
        src = self.coords()
        i0 = src.astype(np.intp)  # src >= 0, so truncation is floor
        w1 = src - i0  # exact: i0 is within one unit below src
        w0 = 1.0 - w1
        i1 = np.minimum(i0 + 1, self.n_src - 1)
        return AxisSamples(i0, i1, w0, w1)

    def nearest(self) -> np.ndarray:
        """Nearest source index per output pixel (round half up, like TF's nearest resize)."""
        src = self.coords()
        idx = src.astype(np.intp)  # floor, src >= 0
        idx += (src - idx) >= 0.5  # exact, unlike floor(src + 0.5)
        return np.minimum(idx, self.n_src - 1)


@dataclass(frozen=True)
class SampleGrid:
    """Per-axis maps from output pixels (rows, cols) to the logit grid."""

    rows: AxisMap
    cols: AxisMap

    @property
    def src_hw(self) -> tuple[int, int]:
        return (self.rows.n_src, self.cols.n_src)

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.rows.n_dst, self.cols.n_dst)

    @classmethod
    def for_model(
        cls,
        logits_hw: tuple[int, int],
        input_hw: tuple[int, int],
        out_hw: tuple[int, int],
        *,
        align_corners: bool,
        content_box: tuple[float, float, float, float] | None = None,
    ) -> SampleGrid:
        """Geometry for a model whose ``logits_hw`` grid covers its ``input_hw`` input, of
        which the image occupies ``content_box = (top, left, height, width)`` (default: the
        whole input, i.e. a stretched image), rendered at the original ``out_hw``. See
        :meth:`AxisMap.for_model` for the exact semantics."""
        if content_box is None:
            content_box = (0, 0, input_hw[0], input_hw[1])
        top, left, height, width = content_box
        rows = AxisMap.for_model(
            n_logits=logits_hw[0], n_input=input_hw[0], start=top, size=height,
            n_out=out_hw[0], align_corners=align_corners,
        )  # fmt: skip
        cols = AxisMap.for_model(
            n_logits=logits_hw[1], n_input=input_hw[1], start=left, size=width,
            n_out=out_hw[1], align_corners=align_corners,
        )  # fmt: skip
        return cls(rows, cols)

    @classmethod
    def stretch(
        cls, src_hw: tuple[int, int], out_hw: tuple[int, int], *, align_corners: bool = False
    ) -> SampleGrid:
        """Whole source grid onto the whole output (no model input in between)."""
        return cls.for_model(src_hw, src_hw, out_hw, align_corners=align_corners)


# --- shared validation and dequantisation -------------------------------------------------
def _check_logits(
    logits: np.ndarray, grid: SampleGrid, scale: float | None, zero_point: int | None
) -> tuple[np.ndarray, float, int]:
    """Return (h, w, C) logits and the quantization to apply; refuse inputs for which the
    exactness argument in the module docstring does not hold."""
    q = np.asarray(logits)
    if q.ndim == 4 and q.shape[0] == 1:
        q = q[0]
    if q.ndim != 3:
        raise ValueError(f"logits must be (h, w, C) or (1, h, w, C), got shape {q.shape}")
    h, w, n_cls = q.shape
    if (h, w) != grid.src_hw:
        raise ValueError(f"logits grid {(h, w)} does not match the sample grid {grid.src_hw}")
    if not 1 <= n_cls <= _MAX_CLASSES:
        raise ValueError(f"need 1..{_MAX_CLASSES} classes, got {n_cls}")
    if q.dtype in _INT_DTYPES:
        s = 1.0 if scale is None else float(scale)
        zp = 0 if zero_point is None else zero_point
        if not _MIN_SCALE <= s <= _MAX_SCALE:
            raise ValueError(f"quantization scale must be in [2**-126, 2**127], got {scale!r}")
        if isinstance(zp, (bool, np.bool_)) or int(zp) != zp or abs(int(zp)) > _MAX_ZERO_POINT:
            raise ValueError(f"zero point must be an integer of magnitude <= 2**16, got {zp!r}")
        return q, s, int(zp)
    if q.dtype in _FLOAT_DTYPES:
        if scale is not None or zero_point is not None:
            raise ValueError("float logits take no scale/zero_point")
        if not np.isfinite(q).all():
            raise ModelError("model produced non-finite logits (NaN or inf)")
        return q, 1.0, 0
    raise TypeError(
        f"unsupported logits dtype {q.dtype}; expected uint8, int8, int16, float16 or float32"
    )


def _dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """float64 logit values. The reference and the fast path both call exactly this, so the
    values they interpolate are the same bits."""
    if q.dtype.kind == "f":
        return q.astype(np.float64)
    return (q.astype(np.float64) - float(zero_point)) * scale


# --- reference ---------------------------------------------------------------------------
def upsample_argmax_reference(
    logits: np.ndarray,
    grid: SampleGrid,
    scale: float | None = None,
    zero_point: int | None = None,
) -> np.ndarray:
    """The naive definition: dequantize to float64, sample bilinearly at every output pixel
    (``(v00*wx0 + v01*wx1)*wy0 + (v10*wx0 + v11*wx1)*wy1``), argmax over classes (ties go to
    the lowest class). Row bands only bound the memory; each pixel is computed independently.
    """
    q, s, zp = _check_logits(logits, grid, scale, zero_point)
    v = _dequantize(q, s, zp)
    ys, xs = grid.rows.samples(), grid.cols.samples()
    out_h, out_w = grid.out_hw
    n_cls = v.shape[2]
    wx0 = xs.w0[None, :, None]
    wx1 = xs.w1[None, :, None]
    mask = np.empty((out_h, out_w), dtype=np.uint8)
    band = max(1, (1 << 21) // (out_w * n_cls))
    for y in range(0, out_h, band):
        rows = slice(y, y + band)
        top, bottom = v[ys.i0[rows]], v[ys.i1[rows]]  # (r, w, C)
        v00, v01 = top[:, xs.i0], top[:, xs.i1]  # (r, W, C)
        v10, v11 = bottom[:, xs.i0], bottom[:, xs.i1]
        wy0 = ys.w0[rows, None, None]
        wy1 = ys.w1[rows, None, None]
        value = (v00 * wx0 + v01 * wx1) * wy0 + (v10 * wx0 + v11 * wx1) * wy1
        mask[rows] = np.argmax(value, axis=2)
    return mask


# --- fast path ---------------------------------------------------------------------------
def _bands(i0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of output pixels that sample the same pair of logit cells (``i0`` is
    non-decreasing): (first pixel, logit index, length) of each run."""
    n = i0.shape[0]
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(i0[1:], i0[:-1], out=change[1:])
    start = np.flatnonzero(change)
    length = np.diff(start, append=n)
    return start, i0[start], length


def upsample_argmax(
    logits: np.ndarray,
    grid: SampleGrid,
    scale: float | None = None,
    zero_point: int | None = None,
) -> np.ndarray:
    """Same mask as :func:`upsample_argmax_reference` (bit for bit), without materialising
    H x W x C: uniform cells are filled from the low-resolution argmax, and only the pixels
    of boundary cells are interpolated, for the classes that can still win there."""
    q, s, zp = _check_logits(logits, grid, scale, zero_point)
    h, w, _ = q.shape
    out_h, out_w = grid.out_hw
    ys, xs = grid.rows.samples(), grid.cols.samples()

    # Low-resolution argmax on the raw values: dequantization is strictly increasing.
    label = np.argmax(q, axis=2).astype(np.uint8)
    next_row = np.minimum(np.arange(h) + 1, h - 1)
    next_col = np.minimum(np.arange(w) + 1, w - 1)

    y_start, y_cell, y_len = _bands(ys.i0)
    x_start, x_cell, x_len = _bands(xs.i0)
    top = label[y_cell]
    bottom = label[next_row[y_cell]]
    c00 = top[:, x_cell]
    mixed = (
        (c00 != top[:, next_col[x_cell]])
        | (c00 != bottom[:, x_cell])
        | (c00 != bottom[:, next_col[x_cell]])
    )

    # Uniform fill: every band of rows is one row of band labels repeated.
    filled_rows = c00 if out_w == c00.shape[1] else np.repeat(c00, x_len, axis=1)
    mask = filled_rows if out_h == c00.shape[0] else np.repeat(filled_rows, y_len, axis=0)
    mask = np.ascontiguousarray(mask)

    band_y, band_x = np.nonzero(mixed)
    if band_y.size == 0:
        return mask

    # Candidate classes per boundary cell (raw values compare like dequantized ones).
    a0, b0 = y_cell[band_y], x_cell[band_x]
    a1, b1 = next_row[a0], next_col[b0]
    corners = np.stack([q[a0, b0], q[a0, b1], q[a1, b0], q[a1, b1]])  # (4, J, C)
    best_min = corners.min(axis=0).max(axis=1)
    cand = corners.max(axis=0) >= best_min[:, None]
    n_cand = cand.sum(axis=1)

    flat = mask.reshape(-1)
    for k in np.unique(n_cand):
        sel = np.flatnonzero(n_cand == k)
        classes = np.nonzero(cand[sel])[1].reshape(-1, int(k))  # ascending per cell
        values = _dequantize(np.take_along_axis(corners[:, sel], classes[None], axis=2), s, zp)
        cy, cx = band_y[sel], band_x[sel]
        rows_max, cols_max = int(y_len[cy].max()), int(x_len[cx].max())
        per_batch = max(1, _BATCH_PIXELS // (rows_max * cols_max * int(k)))
        for j in range(0, sel.size, per_batch):
            part = slice(j, j + per_batch)
            _solve_cells(
                flat, out_w, values[:, part], classes[part],
                y_start[cy[part]], y_len[cy[part]], x_start[cx[part]], x_len[cx[part]],
                rows_max, cols_max, ys, xs,
            )  # fmt: skip
    return mask


def _solve_cells(
    flat: np.ndarray,
    out_w: int,
    values: np.ndarray,
    classes: np.ndarray,
    row0: np.ndarray,
    n_rows: np.ndarray,
    col0: np.ndarray,
    n_cols: np.ndarray,
    rows_max: int,
    cols_max: int,
    ys: AxisSamples,
    xs: AxisSamples,
) -> None:
    """Interpolate the candidate classes over whole boundary cells and write their argmax.

    Cells are padded to a common (rows_max, cols_max) block by repeating their last
    row/column; padded pixels recompute a real pixel and write the same label to it.
    ``values`` is (4 corners, J cells, K candidates) float64; ``classes`` (J, K) ascending.
    """
    rows = row0[:, None] + np.minimum(np.arange(rows_max), n_rows[:, None] - 1)  # (J, R)
    cols = col0[:, None] + np.minimum(np.arange(cols_max), n_cols[:, None] - 1)  # (J, X)
    wy0 = ys.w0[rows][:, None, :, None]  # (J, 1, R, 1)
    wy1 = ys.w1[rows][:, None, :, None]
    wx0 = xs.w0[cols][:, None, :]  # (J, 1, X)
    wx1 = xs.w1[cols][:, None, :]
    v00, v01, v10, v11 = (values[i][:, :, None] for i in range(4))  # (J, K, 1)
    # Same operations, same order as the reference.
    top = (v00 * wx0 + v01 * wx1)[:, :, None, :]  # (J, K, 1, X)
    bottom = (v10 * wx0 + v11 * wx1)[:, :, None, :]
    value = top * wy0
    value += bottom * wy1  # (J, K, R, X)
    n_k = classes.shape[1]
    win: Any
    if n_k == 2:
        upper = value[:, 1] > value[:, 0]  # ties go to the lower class, like np.argmax
        win = np.where(upper, classes[:, 1, None, None], classes[:, 0, None, None])
    else:
        pick = np.argmax(value, axis=1)  # (J, R, X)
        win = np.take_along_axis(classes[:, :, None], pick.reshape(len(pick), 1, -1), axis=1)
        win = win.reshape(pick.shape)
    index = (rows * out_w)[:, :, None] + cols[:, None, :]
    flat[index] = win


# --- label maps ----------------------------------------------------------------------------
def nearest_resize_labels(label_map: np.ndarray, grid: SampleGrid | tuple[int, int]) -> np.ndarray:
    """Resize a model's own argmax map (e.g. 513x513 int64 ``ArgMax``) to the output with
    nearest-neighbour sampling of the same geometry (content box included). ``grid`` may be
    an output size ``(H, W)``: the whole map then stretches onto it (half-pixel centres)."""
    labels = np.asarray(label_map)
    if labels.ndim == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"label map must be a 2-D integer array, got {labels.dtype} {labels.shape}"
        )
    if not isinstance(grid, SampleGrid):
        grid = SampleGrid.stretch(labels.shape, (int(grid[0]), int(grid[1])))
    if labels.shape != grid.src_hw:
        raise ValueError(f"label map {labels.shape} does not match the sample grid {grid.src_hw}")
    if labels.size and (labels.min() < 0 or labels.max() >= _MAX_CLASSES):
        raise ValueError(f"labels must be in [0, {_MAX_CLASSES}) to fit a uint8 mask")
    _, y_src, y_len = _bands(grid.rows.nearest())
    rows = labels[y_src].astype(np.uint8)[:, grid.cols.nearest()]
    return rows if rows.shape[0] == grid.out_hw[0] else np.repeat(rows, y_len, axis=0)


_COUNT_CHUNK = 1 << 20


def class_pixel_counts(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixels per class (int64, length ``n_classes``) — the basis of class areas."""
    m = np.asarray(mask)
    if m.dtype.kind not in "iu":
        raise ValueError(f"mask must be an integer array, got {m.dtype}")
    flat = m.reshape(-1)
    # bincount copies its input to intp (8 bytes a pixel): count in chunks so a 40 MP mask
    # costs 8 MB at a time, not 320 MB.
    counts = np.zeros(n_classes, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_CHUNK):
        part = np.bincount(flat[start : start + _COUNT_CHUNK], minlength=n_classes)
        if part.shape[0] > counts.shape[0]:
            counts = np.pad(counts, (0, part.shape[0] - counts.shape[0]))
        counts[: part.shape[0]] += part
    if counts.shape[0] > n_classes:
        raise ValueError(f"mask holds class {counts.shape[0] - 1} but n_classes={n_classes}")
    return counts
