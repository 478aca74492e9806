"""The engine end to end on Coral's real models and images."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import pixel_iou, read_rgb

from segd.engine import Segmenter, open_runner, summary
from segd.errors import BadImage, ChecksumMismatch, EmptyImage, ModelError, UnsupportedImage
from segd.runtime import open_cpu
from segd.variants import Manifest, load_manifest


def in_graph_argmax(model: Path, rgb: np.ndarray) -> np.ndarray:
    """The unmodified Coral model's own RESIZE_BILINEAR + ARG_MAX output."""
    runner = open_cpu(model.read_bytes())
    return runner.run(rgb).astype(np.uint8)


@pytest.fixture(scope="module")
def segmenters(manifest: Manifest, models_dir: Path) -> dict[str, Segmenter]:
    return {
        name: Segmenter.open(v, models_dir=models_dir, accelerator="cpu")
        for name, v in manifest.variants.items()
    }


@pytest.mark.parametrize(
    ("variant", "bar"), [("deeplabv3_mnv2_pascal", 0.95), ("deeplabv3_mnv2_dm05_pascal", 0.90)]
)
def test_bird_mask_matches_reference_and_the_models_own_output(
    segmenters: dict[str, Segmenter], test_data: Path, models_dir: Path, variant: str, bar: float
) -> None:
    seg = segmenters[variant]
    data = (test_data / "bird_segmentation.bmp").read_bytes()
    reference = cv2.imread(str(test_data / "bird_segmentation_mask.bmp"), cv2.IMREAD_UNCHANGED)
    ours = seg.segment(data).mask
    theirs = in_graph_argmax(models_dir / seg.variant.cpu.name, read_rgb(test_data / "bird_segmentation.bmp"))
    iou_ours, iou_theirs = pixel_iou(ours, reference), pixel_iou(theirs, reference)
    print(f"{variant}: pixel-IoU ours {iou_ours:.4f}, in-graph {iou_theirs:.4f}, "
          f"agreement {float((ours == theirs).mean()):.4f}")
    assert iou_ours > bar
    assert iou_ours >= iou_theirs - 0.005
    assert (ours == theirs).mean() >= 0.99


def test_cityscapes_mask_agrees_with_reference(
    segmenters: dict[str, Segmenter], test_data: Path
) -> None:
    seg = segmenters["deeplab_edgetpu_slim_cityscapes"]
    mask = seg.segment((test_data / "cityscapes_segmentation.bmp").read_bytes()).mask
    reference = cv2.imread(str(test_data / "cityscapes_segmentation_mask.bmp"), cv2.IMREAD_UNCHANGED)
    assert (mask == reference).mean() > 0.90


def test_mask_comes_out_at_the_original_size_for_any_image_size(
    segmenters: dict[str, Segmenter], test_data: Path
) -> None:
    seg = segmenters["deeplabv3_mnv2_pascal"]
    data = (test_data / "bird.bmp").read_bytes()  # 512x343
    for keep_aspect in (False, True):
        result = seg.segment(data, keep_aspect=keep_aspect)
        assert result.mask.shape == (343, 512)
        assert result.mask.dtype == np.uint8
        assert result.counts.sum() == 343 * 512
        names = [c["label"] for c in summary(result, seg)["classes"]]
        assert names[:2] == ["background", "bird"] or names[0] == "bird"


def test_letterboxed_and_stretched_masks_mostly_agree(
    segmenters: dict[str, Segmenter], test_data: Path
) -> None:
    seg = segmenters["deeplabv3_mnv2_pascal"]
    data = (test_data / "cat.bmp").read_bytes()
    a = seg.segment(data, keep_aspect=False).mask
    b = seg.segment(data, keep_aspect=True).mask
    assert (a == b).mean() > 0.9
    assert 8 in np.unique(b)  # cat


def test_reduced_jpeg_decode_still_gives_an_original_size_mask(
    segmenters: dict[str, Segmenter], test_data: Path
) -> None:
    seg = segmenters["deeplabv3_mnv2_pascal"]
    big = cv2.resize(cv2.imread(str(test_data / "bird.bmp")), (2048, 1372), interpolation=cv2.INTER_CUBIC)
    jpeg = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    full = seg.segment(jpeg, reduce=False)
    reduced = seg.segment(jpeg, reduce=True)
    assert reduced.image.reduce == 2  # 1024x686 still covers 513x513
    assert reduced.mask.shape == full.mask.shape == (1372, 2048)
    assert (reduced.mask == full.mask).mean() > 0.97


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", EmptyImage),
        (b"hello, I am not an image", UnsupportedImage),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, BadImage),
    ],
)
def test_bad_input_raises_a_typed_error(
    segmenters: dict[str, Segmenter], data: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        segmenters["deeplabv3_mnv2_pascal"].segment(data)
    assert str(info.value)


def test_corrupt_model_file_is_refused_naming_the_file(models_dir: Path, tmp_path: Path) -> None:
    variant = load_manifest(models_dir=models_dir).get("deeplabv3_mnv2_dm05_pascal")
    broken = tmp_path / variant.cpu.name
    data = bytearray((models_dir / variant.cpu.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=variant.cpu.name):
        open_runner(variant, models_dir=tmp_path, accelerator="cpu", download=False)


def test_model_that_differs_from_the_manifest_is_refused_naming_what_differs(
    models_dir: Path, tmp_path: Path
) -> None:
    text = (Path(__file__).parent.parent / "models" / "variants.toml").read_text()
    # Claim the DM0.5 file has 20 classes: the loaded output tensor says 21.
    text = text.replace("shape = [1, 33, 33, 21]\ndtype = \"uint8\"\nstride = 16\nalign_corners = true\nstrip_tail = true\n[variants.deeplabv3_mnv2_dm05_pascal.files.cpu]",
                        "shape = [1, 33, 33, 20]\ndtype = \"uint8\"\nstride = 16\nalign_corners = true\nstrip_tail = true\n[variants.deeplabv3_mnv2_dm05_pascal.files.cpu]")
    manifest_path = tmp_path / "variants.toml"
    manifest_path.write_text(text)
    variant = load_manifest([manifest_path]).get("deeplabv3_mnv2_dm05_pascal")
    assert variant.output.shape == (1, 33, 33, 20)
    shutil.copy(models_dir / variant.cpu.name, tmp_path / variant.cpu.name)
    with pytest.raises(ModelError, match=r"deeplabv3_mnv2_dm05_pascal_quant\.tflite: output tensor shape \[1, 33, 33, 21\] != manifest \[1, 33, 33, 20\]"):
        open_runner(variant, models_dir=tmp_path, accelerator="cpu", download=False)
