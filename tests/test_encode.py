"""segd.encode (indexed mask PNG, class summary, overlay, JPEG/PNG output) and segd.labels
(VOC palette, manifest palettes, Labels)."""

from __future__ import annotations

import io
import struct
import tomllib
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from segd.encode import class_summary, encode_image, encode_mask_png, overlay
from segd.errors import BadParameter, ModelError
from segd.labels import Labels, palette_from, voc_palette

REPO = Path(__file__).resolve().parent.parent


def manifest_labels() -> dict[str, Labels]:
    data = tomllib.loads((REPO / "models" / "variants.toml").read_text())
    return {
        name: Labels(names=tuple(t["names"]), palette=palette_from(t["palette"]))
        for name, t in data["labels"].items()
    }


def blob_mask(h: int, w: int, n_classes: int, seed: int = 0) -> np.ndarray:
    """A segmentation-like mask: rectangles of random classes over background 0."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(12):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y : y + int(rng.integers(1, h // 2 + 2)), x : x + int(rng.integers(1, w // 2 + 2))] = (
            rng.integers(1, n_classes)
        )
    return mask


def png_chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, payload, stored crc) of every chunk; checks the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        tag = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        out.append((tag, payload, crc))
        pos += 12 + length
    assert pos == len(data)
    return out


# ----------------------------------------------------------------------------------------------
# Indexed mask PNG
# ----------------------------------------------------------------------------------------------
def test_mask_png_structure_is_valid_indexed_png() -> None:
    mask = blob_mask(37, 53, 21)
    pal = voc_palette()
    data = encode_mask_png(mask, pal)
    chunks = png_chunks(data)
    assert [c[0] for c in chunks] == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    for tag, payload, crc in chunks:
        assert zlib.crc32(tag + payload) == crc, tag
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (w, h, depth, ctype, comp, filt, interlace) == (53, 37, 8, 3, 0, 0, 0)
    assert chunks[1][1] == pal.tobytes()
    raw = np.frombuffer(zlib.decompress(chunks[2][1]), np.uint8).reshape(37, 54)
    assert np.all(raw[:, 0] == 0)  # filter type None on every row
    np.testing.assert_array_equal(raw[:, 1:], mask)


def test_mask_png_round_trips_class_ids_through_opencv() -> None:
    # OpenCV expands palette PNGs to colours; the VOC colours are distinct, so mapping
    # each colour back to its index recovers the class ids exactly.
    pal = voc_palette()
    assert len({tuple(c) for c in pal.tolist()}) == 256
    colour_to_id = {tuple(c): i for i, c in enumerate(pal.tolist())}
    for mask in (
        blob_mask(120, 200, 21, seed=1),
        np.arange(256, dtype=np.uint8).reshape(16, 16),
        np.full((1, 1), 7, np.uint8),
        np.arange(40, dtype=np.uint8).reshape(1, 40),
        np.arange(40, dtype=np.uint8).reshape(40, 1),
    ):
        data = encode_mask_png(mask, pal)
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert bgr.shape == (*mask.shape, 3)
        rgb = bgr[:, :, ::-1].reshape(-1, 3).tolist()
        ids = np.array([colour_to_id[tuple(c)] for c in rgb], np.uint8).reshape(mask.shape)
        np.testing.assert_array_equal(ids, mask)


def test_mask_png_reads_as_palette_image_in_pillow() -> None:
    image_mod = pytest.importorskip("PIL.Image")
    labels = manifest_labels()["cityscapes"]
    mask = blob_mask(64, 96, len(labels), seed=2)
    with image_mod.open(io.BytesIO(encode_mask_png(mask, labels.palette))) as im:
        assert im.mode == "P" and im.size == (96, 64)
        np.testing.assert_array_equal(np.asarray(im), mask)
        pal = np.array(im.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(pal[: len(labels)], labels.palette[: len(labels)])
    np.testing.assert_array_equal(pal[0], (128, 64, 128))  # cityscapes road


def test_mask_png_of_a_real_reference_mask_is_small_and_exact(test_data: Path) -> None:
    mask = cv2.imread(str(test_data / "bird_segmentation_mask.bmp"), cv2.IMREAD_GRAYSCALE)
    big = cv2.resize(mask, (1920, 1080), interpolation=cv2.INTER_NEAREST)
    data = encode_mask_png(big, voc_palette())
    assert len(data) < big.size // 50  # compresses well (runs of few values)
    raw = zlib.decompress(png_chunks(data)[2][1])
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(1080, 1921)[:, 1:], big)


def test_mask_png_accepts_a_short_palette_covering_the_ids() -> None:
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    pal = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    chunks = png_chunks(encode_mask_png(mask, pal))
    assert chunks[1][1] == bytes([0, 0, 0, 255, 0, 0, 0, 255, 0])


def test_mask_png_refuses_ids_without_a_colour_and_bad_input() -> None:
    with pytest.raises(BadParameter, match="class id 3"):
        encode_mask_png(np.array([[0, 3]], np.uint8), [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    with pytest.raises(BadParameter):
        encode_mask_png(np.zeros((2, 2), np.int32), voc_palette())
    with pytest.raises(BadParameter):
        encode_mask_png(np.zeros((0, 2), np.uint8), voc_palette())
    with pytest.raises(BadParameter):
        encode_mask_png(np.zeros((2, 2), np.uint8), np.zeros((257, 3), np.uint8))
    with pytest.raises(BadParameter):
        encode_mask_png(np.zeros((2, 2), np.uint8), [[0, 0, 300]])
    with pytest.raises(BadParameter):
        encode_mask_png(np.zeros((2, 2), np.uint8), voc_palette(), level=10)


def test_mask_png_of_a_non_contiguous_view_is_correct() -> None:
    mask = blob_mask(50, 60, 21, seed=3)
    view = mask[::2, 5:45]
    raw = zlib.decompress(png_chunks(encode_mask_png(view, voc_palette()))[2][1])
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(25, 41)[:, 1:], view)


# ----------------------------------------------------------------------------------------------
# Class summary
# ----------------------------------------------------------------------------------------------
def test_class_summary_lists_present_classes_largest_first() -> None:
    labels = manifest_labels()["pascal_voc"]
    mask = blob_mask(90, 70, len(labels), seed=4)
    counts = np.bincount(mask.ravel(), minlength=len(labels))
    summary = class_summary(counts, labels)
    reference = Counter(mask.ravel().tolist())
    assert {row["id"] for row in summary} == set(reference)
    for row in summary:
        assert row["pixels"] == reference[row["id"]]
        assert row["label"] == labels.names[row["id"]]
        assert row["fraction"] == pytest.approx(reference[row["id"]] / mask.size)
    pixels = [row["pixels"] for row in summary]
    assert pixels == sorted(pixels, reverse=True)
    assert sum(row["fraction"] for row in summary) == pytest.approx(1.0)
    assert all(isinstance(row["id"], int) and isinstance(row["pixels"], int) for row in summary)


def test_class_summary_breaks_ties_by_id_and_names_unknown_ids() -> None:
    labels = Labels(names=("background", "cat"), palette=voc_palette(2))
    summary = class_summary(np.array([5, 0, 5, 9]), labels)
    assert [(r["id"], r["label"]) for r in summary] == [
        (3, "class_3"),
        (0, "background"),
        (2, "class_2"),
    ]
    assert class_summary(np.zeros(3, np.int64), labels) == []
    with pytest.raises(BadParameter):
        class_summary(np.array([1, -1]), labels)


# ----------------------------------------------------------------------------------------------
# Overlay
# ----------------------------------------------------------------------------------------------
def test_overlay_blends_classes_and_leaves_background_untouched() -> None:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = blob_mask(40, 50, 21, seed=5)
    pal = voc_palette()
    out = overlay(rgb, mask, pal, alpha=0.5)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    bg = mask == 0
    assert bg.any() and (~bg).any()
    np.testing.assert_array_equal(out[bg], rgb[bg])
    expected = 0.5 * rgb.astype(np.float64) + 0.5 * pal[mask].astype(np.float64)
    assert np.abs(out[~bg].astype(np.float64) - expected[~bg]).max() <= 0.5 + 1e-6


def test_overlay_alpha_extremes_and_tinting_everything() -> None:
    rgb = np.full((4, 4, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2, 15]] * 4, np.uint8)
    pal = voc_palette()
    np.testing.assert_array_equal(overlay(rgb, mask, pal, alpha=0.0), rgb)
    full = overlay(rgb, mask, pal, alpha=1.0)
    np.testing.assert_array_equal(full[:, 1:], pal[mask[:, 1:]])
    np.testing.assert_array_equal(full[:, 0], rgb[:, 0])
    all_tinted = overlay(rgb, mask, pal, alpha=1.0, background=None)
    np.testing.assert_array_equal(all_tinted, pal[mask])


def test_overlay_refuses_mismatched_inputs() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(BadParameter):
        overlay(rgb, np.zeros((4, 5), np.uint8), voc_palette())
    with pytest.raises(BadParameter):
        overlay(rgb, np.zeros((4, 4), np.uint8), voc_palette(), alpha=1.5)
    with pytest.raises(BadParameter):
        overlay(rgb[:, :, 0], np.zeros((4, 4), np.uint8), voc_palette())


# ----------------------------------------------------------------------------------------------
# JPEG / PNG output
# ----------------------------------------------------------------------------------------------
def test_encode_image_keeps_rgb_order() -> None:
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)
    rgb[:, 16:] = (0, 0, 255)
    png = encode_image(rgb, "png")
    np.testing.assert_array_equal(
        cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR_RGB), rgb
    )
    jpeg = encode_image(rgb, "jpeg", quality=95)
    assert jpeg[:3] == b"\xff\xd8\xff"
    back = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR_RGB).astype(int)
    assert np.abs(back[4:12, 4:12] - (255, 0, 0)).max() < 8
    assert np.abs(back[4:12, 20:28] - (0, 0, 255)).max() < 8


def test_encode_image_quality_changes_size_and_bad_arguments_are_refused() -> None:
    rgb = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert len(encode_image(rgb, "jpg", quality=30)) < len(encode_image(rgb, "jpeg", quality=95))
    with pytest.raises(BadParameter):
        encode_image(rgb, "gif")
    with pytest.raises(BadParameter):
        encode_image(rgb, "jpeg", quality=0)
    with pytest.raises(BadParameter):
        encode_image(rgb.astype(np.float32), "png")


# ----------------------------------------------------------------------------------------------
# Labels and palettes
# ----------------------------------------------------------------------------------------------
def _voc_devkit_colormap(n: int) -> np.ndarray:
    """The loop from the PASCAL VOC devkit (VOClabelcolormap), written out bit by bit."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def test_voc_palette_is_the_devkit_colour_map() -> None:
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    np.testing.assert_array_equal(pal, _voc_devkit_colormap(256))
    # Colours as published with the VOC 2012 segmentation ground truth.
    assert pal[1].tolist() == [128, 0, 0]  # aeroplane
    assert pal[3].tolist() == [128, 128, 0]  # bird
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # void / boundary
    np.testing.assert_array_equal(voc_palette(21), pal[:21])


def test_palette_from_accepts_voc_and_lists_padded_with_voc() -> None:
    np.testing.assert_array_equal(palette_from("voc"), voc_palette())
    pal = palette_from([[1, 2, 3], [4, 5, 6]])
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[:2].tolist() == [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(pal[2:], voc_palette()[2:])


@pytest.mark.parametrize(
    "spec",
    [
        "rainbow",
        [[1, 2]],
        [[0, 0, 256]],
        [[-1, 0, 0]],
        [[0.5, 0, 0]],
        [[0, 0, 0]] * 257,
        [["a", "b", "c"]],
    ],
)
def test_palette_from_refuses_malformed_specs(spec: object) -> None:
    with pytest.raises(ModelError):
        palette_from(spec)  # type: ignore[arg-type]


def test_manifest_label_tables_load() -> None:
    labels = manifest_labels()
    voc, city = labels["pascal_voc"], labels["cityscapes"]
    assert len(voc) == 21 and voc.names[3] == "bird" and voc.names[15] == "person"
    assert len(city) == 19 and city.names[0] == "road"
    np.testing.assert_array_equal(voc.palette, voc_palette())
    assert city.palette.shape == (256, 3)
    assert city.palette[13].tolist() == [0, 0, 142]  # car
    assert Labels.from_table({"names": ["a", "b"], "palette": "voc"}).names == ("a", "b")


def test_labels_validate_and_freeze_the_palette() -> None:
    labels = Labels(names=["background", "thing"], palette=voc_palette(2))  # type: ignore[arg-type]
    assert labels.names == ("background", "thing")
    with pytest.raises(ValueError):
        labels.palette[0, 0] = 1
    with pytest.raises(ModelError):
        Labels(names=("a", "b", "c"), palette=voc_palette(2))
    with pytest.raises(ModelError):
        Labels(names=("a",), palette=np.zeros((4, 4), np.uint8))
    with pytest.raises(ModelError):
        Labels(names=(), palette=voc_palette(2))
