"""Output forms of POST /segment beyond the mask: class filter, minimum region area, polygons
and COCO RLE. RLE is checked against COCO's own decoder (pycocotools); the HTTP tests use the
real daemon and models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pycocotools.mask as coco
import pytest
from conftest import read_mask_png
from daemon import Daemon, start_daemon
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segd import regions
from segd.errors import BadParameter
from segd.labels import Labels, voc_palette

DM05 = "deeplabv3_mnv2_dm05_pascal"
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
CITY = "deeplab_edgetpu_slim_cityscapes"


# --- pure functions ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_rle_is_what_pycocotools_encodes_and_decodes(binary: np.ndarray) -> None:
    counts = regions.rle_counts(binary)
    ref = coco.encode(np.asfortranarray(binary.astype(np.uint8)))
    assert regions.rle_string(counts) == ref["counts"].decode()
    h, w = binary.shape
    assert np.array_equal(coco.decode({"size": [h, w], "counts": regions.rle_string(counts).encode()}), binary)
    assert np.array_equal(coco.decode(coco.frPyObjects({"size": [h, w], "counts": counts}, h, w)), binary)


def test_keep_classes_removes_other_classes_and_small_regions() -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[2:12, 2:12] = 15  # person, 100 px
    mask[20:22, 20:22] = 15  # person, 4 px
    mask[30:38, 30:38] = 7  # car, 64 px
    out = regions.keep_classes(mask, [15], 0, 0)
    assert set(np.unique(out)) == {0, 15} and (out == 15).sum() == 104
    out = regions.keep_classes(mask, None, 10, 0)
    assert (out == 15).sum() == 100 and (out == 7).sum() == 64
    out = regions.keep_classes(mask, [7], 0, 255)  # no background class: removed -> 255
    assert set(np.unique(out)) == {7, 255}


def test_polygons_trace_each_region_of_a_class() -> None:
    mask = np.zeros((50, 60), np.uint8)
    mask[5:20, 10:30] = 3
    mask[30:45, 40:55] = 3
    polys = regions.polygons(mask, 3)
    assert len(polys) == 2
    drawn = np.zeros_like(mask)
    for p in polys:
        cv2.fillPoly(drawn, [np.array(p, np.int32).reshape(-1, 2)], 1)
    assert np.array_equal(drawn.astype(bool), mask == 3)
    # COCO reads them too. The vertices are pixel centres (OpenCV's contours), so COCO's
    # rasterizer, which fills the polygon's area, gives half a pixel less at each edge.
    rles = coco.frPyObjects([[float(v) for v in p] for p in polys], 50, 60)
    assert int(coco.area(coco.merge(rles))) == (15 - 1) * (20 - 1) + (15 - 1) * (15 - 1)


def test_a_fragmented_mask_is_refused_before_its_polygons_or_runs_are_built() -> None:
    stripes = np.zeros((200, 200), np.uint8)
    stripes[::2] = 1  # 100 one-pixel-high regions, 40,000 runs column-major
    doc = {"classes": [{"id": 1, "label": "b", "pixels": 20000, "fraction": 0.5}]}
    for shape in (regions.Shape(polygons=True), regions.Shape(rle="compressed")):
        with pytest.raises(BadParameter, match="too fragmented"):
            shape.describe({"classes": [dict(c) for c in doc["classes"]]}, stripes, None, 0, max_runs=150)
    regions.Shape(polygons=True, rle="compressed").describe({"classes": [dict(doc["classes"][0])]}, stripes, None, 0)


def test_shape_names_unknown_classes() -> None:
    labels = Labels(("background", "cat", "dog"), voc_palette(3))
    assert regions.Shape(("dog", "1")).resolve(labels) == ([2, 1], 0)
    with pytest.raises(BadParameter, match="unknown class 'horse'"):
        regions.Shape(("horse",)).resolve(labels)
    assert Labels(("road", "car"), voc_palette(2)).background is None


# --- over HTTP --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("regions"), models_dir,
                     "--model", DM05, "--model", CITY, "--accelerator", "cpu")  # fmt: skip
    yield d
    d.stop()


def post(d: Daemon, data: bytes, **params: str) -> httpx.Response:
    return httpx.post(d.url + "/segment", params={"model": DM05, **params}, content=data,
                      headers={"content-type": "image/bmp"}, timeout=60)  # fmt: skip


def test_class_filter_and_min_area_shape_the_mask_and_the_json(daemon: Daemon, test_data: Path) -> None:
    data = (test_data / "bird.bmp").read_bytes()
    full = read_mask_png(post(daemon, data).content)
    present = set(np.unique(full)) - {0}
    assert 3 in present  # bird
    r = post(daemon, data, classes="bird")
    kept = read_mask_png(r.content)
    assert set(np.unique(kept)) <= {0, 3}
    assert np.array_equal(kept == 3, full == 3)
    doc = post(daemon, data, classes="bird,person", format="json").json()
    assert [c["label"] for c in doc["classes"]] == ["bird"]
    assert doc["classes"][0]["pixels"] == int((full == 3).sum())
    big = int((full == 3).sum()) + 1
    doc = post(daemon, data, min_area=str(big), format="json").json()
    assert [c["label"] for c in doc["classes"]] == ["background"]
    r = post(daemon, data, classes="unicorn")
    assert r.status_code == 422 and "unknown class 'unicorn'" in r.json()["detail"]


def test_json_polygons_and_rle_describe_each_class_of_the_mask(daemon: Daemon, test_data: Path) -> None:
    data = (test_data / "bird.bmp").read_bytes()
    mask = read_mask_png(post(daemon, data).content)
    doc = post(daemon, data, format="json", polygons="true", rle="compressed").json()
    plain = post(daemon, data, format="json", rle="uncompressed").json()
    h, w = mask.shape
    for c, u in zip(doc["classes"], plain["classes"], strict=True):
        binary = mask == c["id"]
        assert np.array_equal(coco.decode({"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()}), binary)
        assert np.array_equal(coco.decode(coco.frPyObjects(u["rle"], h, w)), binary)
        assert c["polygons"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in c["polygons"])
        drawn = np.zeros((h, w), np.uint8)
        cv2.fillPoly(drawn, [np.array(p, np.int32).reshape(-1, 2) for p in c["polygons"]], 1)
        assert (drawn.astype(bool) & binary).sum() / binary.sum() > 0.95
    r = post(daemon, data, format="png", polygons="true")
    assert r.status_code == 422 and "format=json" in r.json()["detail"]


def test_overlay_leaves_untinted_only_a_class_named_background(daemon: Daemon, test_data: Path) -> None:
    """Cityscapes has no background class (its class 0 is road): every pixel is tinted."""
    data = (test_data / "cityscapes_segmentation.bmp").read_bytes()
    rgb = cv2.cvtColor(cv2.imread(str(test_data / "cityscapes_segmentation.bmp")), cv2.COLOR_BGR2RGB)
    params = {"model": CITY, "format": "overlay", "overlay_format": "png"}
    r = httpx.post(daemon.url + "/segment", params=params, content=data, headers={"content-type": "image/bmp"}, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["x-segd-summary"])["background"] is None
    out = cv2.cvtColor(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mask = read_mask_png(httpx.post(daemon.url + "/segment", params={"model": CITY}, content=data,
                                    headers={"content-type": "image/bmp"}, timeout=60).content)  # fmt: skip
    road = mask == 0
    assert road.mean() > 0.1
    assert np.abs(out[road].astype(int) - rgb[road].astype(int)).mean() > 5  # road is tinted
    pascal = post(daemon, (test_data / "bird.bmp").read_bytes(), format="json").json()
    assert pascal["background"] == 0
