"""Postprocess: the fast upsample+argmax must give the float64 reference's mask bit for bit,
the reference must agree with the real model's own in-graph resize+argmax, and the geometry
must be TF's resize_bilinear when nothing is padded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from segd.errors import ModelError
from segd.postprocess import (
    AxisMap,
    SampleGrid,
    class_pixel_counts,
    nearest_resize_labels,
    upsample_argmax,
    upsample_argmax_reference,
)

KINDS = ("random", "few_values", "smooth", "near_ties", "constant")
DTYPES = ("uint8", "int8", "float32", "int16", "float16")


@dataclass(frozen=True)
class Case:
    """One drawn input; logits are generated from the seed so large cases stay cheap to draw."""

    kind: str
    dtype: str
    n_classes: int
    logits_hw: tuple[int, int]
    input_hw: tuple[int, int]
    box: tuple[int, int, int, int] | None
    out_hw: tuple[int, int]
    align_corners: bool
    scale: float
    zero_point: int
    seed: int

    def logits(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        h, w = self.logits_hw
        shape = (h, w, self.n_classes)
        if self.kind == "random":
            field = rng.uniform(-1, 1, shape)
        elif self.kind == "few_values":  # exact ties everywhere, at corners and in between
            field = rng.choice(np.array([-0.5, 0.0, 0.5])[: rng.integers(1, 4)], shape)
        elif self.kind == "smooth":  # planes per class: few boundaries, long straight ones
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w, 1)
            a, b, c = rng.uniform(-1, 1, (3, self.n_classes))
            field = a * yy[..., None] + b * xx[..., None] + c
        elif self.kind == "near_ties":  # classes one quantum apart, shuffled per cell
            field = rng.integers(0, 2, shape) / 254.0 + rng.uniform(-0.2, 0.2, (h, w, 1))
        else:
            field = np.full(shape, 0.25)
        if self.dtype.startswith("float"):
            ftype = np.dtype(self.dtype).type
            if self.kind == "near_ties":  # one ulp apart
                base = ftype(rng.uniform(-3, 3))
                up = np.nextafter(base, ftype(np.inf))
                return np.where(rng.integers(0, 2, shape) == 1, up, base).astype(self.dtype)
            return (field * 10).astype(self.dtype)
        info = np.iinfo(self.dtype)
        return np.clip(np.round(field * 127 + 127.5 + info.min), info.min, info.max).astype(
            self.dtype
        )

    def grid(self) -> SampleGrid:
        return SampleGrid.for_model(
            self.logits_hw,
            self.input_hw,
            self.out_hw,
            align_corners=self.align_corners,
            content_box=self.box,
        )

    def quant(self) -> dict[str, float | int]:
        if self.dtype.startswith("float"):
            return {}
        return {"scale": self.scale, "zero_point": self.zero_point}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n_classes = draw(st.one_of(st.integers(1, 6), st.integers(2, 32), st.integers(2, 256)))
    logits_hw = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    input_hw = (draw(st.integers(1, 600)), draw(st.integers(1, 600)))
    box = None
    if draw(st.booleans()):  # padded: the image is a sub-box of the model input
        top = draw(st.integers(0, input_hw[0] - 1))
        left = draw(st.integers(0, input_hw[1] - 1))
        box = (
            top,
            left,
            draw(st.integers(1, input_hw[0] - top)),
            draw(st.integers(1, input_hw[1] - left)),
        )
    # Mostly small outputs (cheap reference), now and then big ones with few classes.
    limit = 700 if n_classes <= 8 and draw(st.integers(0, 9)) == 0 else 72
    out_hw = (draw(st.integers(1, limit)), draw(st.integers(1, limit)))
    if draw(st.integers(0, 3)) == 0:
        # Like the real models (33 -> 513): weights are exact multiples of 1/2**k, so
        # quantized logits tie exactly and only float64 rounding order decides the winner.
        k = draw(st.integers(1, 4))
        input_hw = out_hw = ((logits_hw[0] - 1) * 2**k + 1, (logits_hw[1] - 1) * 2**k + 1)
        box = None
    return Case(
        kind=draw(st.sampled_from(KINDS)),
        dtype=draw(st.sampled_from(DTYPES)),
        n_classes=n_classes,
        logits_hw=logits_hw,
        input_hw=input_hw,
        box=box,
        out_hw=out_hw,
        align_corners=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 0.2014983743429184, 1 / 128, 3.7, 1e-3])),
        zero_point=draw(st.integers(-128, 255)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _case(out_hw: tuple[int, int], **kw: object) -> Case:
    base: dict[str, object] = {
        "kind": "random",
        "dtype": "uint8",
        "n_classes": 21,
        "logits_hw": (33, 33),
        "input_hw": (513, 513),
        "box": None,
        "out_hw": out_hw,
        "align_corners": True,
        "scale": 0.2014983743429184,
        "zero_point": 36,
        "seed": 1,
    }
    base.update(kw)
    return Case(**base)  # type: ignore[arg-type]


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
@example(case=_case((3000, 4000), kind="smooth", n_classes=6, box=(64, 0, 385, 513)))
@example(case=_case((1080, 1920), kind="few_values", dtype="int8", align_corners=False))
@example(case=_case((1080, 1920), kind="near_ties", dtype="float32", n_classes=3))
@example(case=_case((513, 513), kind="few_values", n_classes=3))
@example(case=_case((1, 1), n_classes=256))
@example(case=_case((513, 513), kind="constant", n_classes=2, box=(0, 100, 513, 313)))
def test_fast_mask_is_identical_to_float64_reference(case: Case) -> None:
    logits, grid = case.logits(), case.grid()
    expected = upsample_argmax_reference(logits, grid, **case.quant())  # type: ignore[arg-type]
    got = upsample_argmax(logits, grid, **case.quant())  # type: ignore[arg-type]
    assert got.dtype == np.uint8 and got.shape == case.out_hw
    assert np.array_equal(got, expected)


# --- the real model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pascal_bird(test_data: Path) -> tuple[np.ndarray, dict, np.ndarray]:
    """The uint8 logits, their quantization, and the in-graph ArgMax on the bird image."""
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    interp = interpreter_mod.Interpreter(
        model_path=str(test_data / "deeplabv3_mnv2_pascal_quant.tflite"),
        experimental_preserve_all_tensors=True,
    )
    interp.allocate_tensors()
    bgr = cv2.imread(str(test_data / "bird_segmentation.bmp"), cv2.IMREAD_COLOR)
    assert bgr is not None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    interp.set_tensor(interp.get_input_details()[0]["index"], rgb[None])
    interp.invoke()
    (logits_detail,) = [
        d
        for d in interp.get_tensor_details()
        if d["name"].startswith("logits/semantic/BiasAdd") and list(d["shape"]) == [1, 33, 33, 21]
    ]
    scale, zero_point = logits_detail["quantization"]
    logits = interp.get_tensor(logits_detail["index"])[0]
    argmax = interp.get_tensor(interp.get_output_details()[0]["index"])[0]
    return logits, {"scale": scale, "zero_point": zero_point}, argmax


def test_reference_agrees_with_models_in_graph_resize_and_argmax(
    pascal_bird: tuple[np.ndarray, dict, np.ndarray],
) -> None:
    logits, quant, model_mask = pascal_bird
    assert logits.dtype == np.uint8 and model_mask.shape == (513, 513)
    grid = SampleGrid.for_model((33, 33), (513, 513), (513, 513), align_corners=True)
    ours = upsample_argmax_reference(logits, grid, **quant)
    agreement = float((ours == model_mask).mean())
    print(f"reference vs in-graph RESIZE_BILINEAR+ARG_MAX: {agreement:.5f} of pixels agree")
    assert agreement >= 0.99
    assert set(np.unique(model_mask)) <= set(np.unique(ours))  # a bird is found: 0 and 3
    assert np.array_equal(upsample_argmax(logits, grid, **quant), ours)
    # The other convention is measurably worse: the geometry, not luck, makes the agreement.
    half = SampleGrid.for_model((33, 33), (513, 513), (513, 513), align_corners=False)
    assert (
        float((upsample_argmax_reference(logits, half, **quant) == model_mask).mean()) < agreement
    )


def test_real_logits_upsample_exactly_to_letterboxed_original_sizes(
    pascal_bird: tuple[np.ndarray, dict, np.ndarray],
) -> None:
    logits, quant, _ = pascal_bird
    for out_hw, box, align in [
        ((1080, 1920), (128, 0, 257, 513), True),
        ((3000, 2000), (0, 85, 513, 342), False),
    ]:
        grid = SampleGrid.for_model(
            (33, 33), (513, 513), out_hw, align_corners=align, content_box=box
        )
        ours = upsample_argmax(logits, grid, **quant)
        assert np.array_equal(ours, upsample_argmax_reference(logits, grid, **quant))
        assert (ours == 3).mean() > 0.05  # the bird survives the crop and resize


# --- geometry -----------------------------------------------------------------------------
def _interpolate(values: np.ndarray, grid: SampleGrid) -> np.ndarray:
    ys, xs = grid.rows.samples(), grid.cols.samples()
    top = (
        values[ys.i0][:, xs.i0] * xs.w0[None, :, None]
        + values[ys.i0][:, xs.i1] * xs.w1[None, :, None]
    )
    bot = (
        values[ys.i1][:, xs.i0] * xs.w0[None, :, None]
        + values[ys.i1][:, xs.i1] * xs.w1[None, :, None]
    )
    return top * ys.w0[:, None, None] + bot * ys.w1[:, None, None]


@pytest.mark.tf
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    ("logits_hw", "out_hw"),
    [((33, 33), (513, 513)), ((5, 7), (9, 2)), ((1, 4), (3, 1)), ((4, 6), (1, 11))],
)
def test_unpadded_geometry_is_tf_resize_bilinear(
    align_corners: bool, logits_hw: tuple[int, int], out_hw: tuple[int, int]
) -> None:
    tf = pytest.importorskip("tensorflow")
    values = np.random.default_rng(7).uniform(-4, 4, (*logits_hw, 3)).astype(np.float32)
    expected = tf.compat.v1.image.resize_bilinear(
        values[None], out_hw, align_corners=align_corners, half_pixel_centers=not align_corners
    ).numpy()[0]
    grid = SampleGrid.for_model(logits_hw, out_hw, out_hw, align_corners=align_corners)
    np.testing.assert_allclose(_interpolate(values.astype(np.float64), grid), expected, atol=2e-5)


def test_content_box_maps_to_its_own_logit_range() -> None:
    # 513 input, 33 logits (16 input px per cell), image in rows 128..384 of the input.
    rows = AxisMap.for_model(
        n_logits=33, n_input=513, start=128, size=257, n_out=1000, align_corners=True
    )
    coords = rows.coords()
    # pixel centres: the box spans input coordinates 127.5 .. 384.5, i.e. logits 127.5/16 .. 384.5/16
    assert 127.5 / 16 <= coords[0] < coords[-1] <= 384.5 / 16
    assert np.all(np.diff(coords) > 0)
    half = AxisMap.for_model(
        n_logits=33, n_input=513, start=128, size=256, n_out=256, align_corners=False
    )
    # output pixel y is input pixel 128 + y: logit = (128 + y + 0.5) * 33/513 - 0.5
    np.testing.assert_allclose(half.coords(), (128 + np.arange(256) + 0.5) * 33 / 513 - 0.5)


@pytest.mark.parametrize(
    ("width", "keep_aspect", "tolerance"),
    [(300, False, 0.15), (250, False, 0.15), (200, True, 0.15), (2000, False, 0.4), (1000, True, 0.4)],
)
def test_output_pixels_map_back_to_where_the_resize_put_them(width: int, keep_aspect: bool, tolerance: float) -> None:
    """Independent of our formulas: a one-pixel vertical line at x0, resized by OpenCV through
    fit_to_input, lands with its centroid where our map sends output pixel x0. (Enlarging,
    linear interpolation puts it exactly there; the looser bound is for OpenCV's area
    shrink. Mapping pixel corners instead of centres misses by 0.3-0.6 input pixels.)"""
    from segd.preprocess import fit_to_input

    for x0 in (width // 10, width // 2, width - width // 10):
        img = np.zeros((40, width, 3), np.uint8)
        img[:, x0] = 255
        resized, (top, left, h, w) = fit_to_input(img, (513, 513), keep_aspect)
        row = resized[top + h // 2, :, 0].astype(np.float64)
        centroid = float((row * np.arange(513)).sum() / row.sum())
        cols = AxisMap.for_model(n_logits=513, n_input=513, start=left, size=w, n_out=width,
                                 align_corners=True).coords()  # fmt: skip
        assert abs(cols[x0] - centroid) <= tolerance, (x0, cols[x0], centroid)


def test_size_one_axes_sample_the_corner_without_dividing_by_zero() -> None:
    for align in (True, False):
        one_out = AxisMap.for_model(n_logits=33, n_input=513, n_out=1, align_corners=align)
        one_logit = AxisMap.for_model(n_logits=1, n_input=513, n_out=700, align_corners=align)
        one_input = AxisMap.for_model(n_logits=9, n_input=1, n_out=5, align_corners=align)
        for axis in (one_out, one_logit, one_input):
            assert np.isfinite(axis.coords()).all()
        assert np.all(one_logit.coords() == 0.0)
    # one output pixel stands for the whole image: it reads the middle of it
    assert AxisMap.for_model(n_logits=33, n_input=513, n_out=1, align_corners=True).coords()[0] == 16


def test_content_box_outside_the_input_is_refused() -> None:
    with pytest.raises(ValueError, match="content box"):
        SampleGrid.for_model(
            (33, 33), (513, 513), (10, 10), align_corners=True, content_box=(400, 0, 200, 513)
        )


# --- nearest labels and counts ------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    src=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    out=st.tuples(st.integers(1, 80), st.integers(1, 80)),
    align=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_nearest_labels_pick_the_closest_source_cell(
    src: tuple[int, int], out: tuple[int, int], align: bool, seed: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, 21, src, dtype=np.int64)
    grid = SampleGrid.for_model(
        src, (513, 513), out, align_corners=align, content_box=(13, 40, 400, 300)
    )
    got = nearest_resize_labels(labels, grid)
    expected = np.empty(out, dtype=np.uint8)
    cy, cx = grid.rows.coords(), grid.cols.coords()
    for y in range(out[0]):
        for x in range(out[1]):
            # closest cell; at an exact half the upper one (round half up)
            iy = src[0] - 1 - int(np.argmin(np.abs(np.arange(src[0]) - cy[y])[::-1]))
            ix = src[1] - 1 - int(np.argmin(np.abs(np.arange(src[1]) - cx[x])[::-1]))
            expected[y, x] = labels[iy, ix]
    assert got.dtype == np.uint8
    assert np.array_equal(got, expected)


def test_nearest_labels_keep_the_models_argmax_at_input_size(
    pascal_bird: tuple[np.ndarray, dict, np.ndarray],
) -> None:
    _, _, model_mask = pascal_bird
    grid = SampleGrid.for_model((513, 513), (513, 513), (513, 513), align_corners=True)
    assert np.array_equal(nearest_resize_labels(model_mask, grid), model_mask)
    doubled = nearest_resize_labels(model_mask, (1026, 1026))
    assert np.array_equal(doubled[::2, ::2], model_mask)
    assert np.array_equal(doubled[1::2, 1::2], model_mask)


def test_class_pixel_counts_cover_every_pixel_once() -> None:
    mask = np.random.default_rng(3).integers(0, 5, (37, 41), dtype=np.uint8)
    counts = class_pixel_counts(mask, 21)
    assert counts.dtype == np.int64 and counts.shape == (21,)
    assert counts.sum() == mask.size
    assert [counts[c] for c in range(21)] == [int((mask == c).sum()) for c in range(21)]
    with pytest.raises(ValueError, match="n_classes"):
        class_pixel_counts(mask, 4)


# --- refused inputs -----------------------------------------------------------------------
def test_inputs_outside_the_exactness_argument_are_refused() -> None:
    grid = SampleGrid.for_model((4, 4), (8, 8), (8, 8), align_corners=True)
    floats = np.zeros((4, 4, 3), np.float32)
    for fn in (upsample_argmax, upsample_argmax_reference):
        nan = floats.copy()
        nan[1, 2, 0] = np.nan
        with pytest.raises(ModelError):
            fn(nan, grid)
        with pytest.raises(TypeError, match="dtype"):
            fn(floats.astype(np.float64), grid)
        with pytest.raises(ValueError, match="scale"):
            fn(floats, grid, scale=0.5)
        with pytest.raises(ValueError, match="scale"):
            fn(np.zeros((4, 4, 3), np.uint8), grid, scale=0.0)
        with pytest.raises(ValueError, match="sample grid"):
            fn(np.zeros((5, 4, 3), np.uint8), grid)
        with pytest.raises(ValueError, match="classes"):
            fn(np.zeros((4, 4, 257), np.uint8), grid)
