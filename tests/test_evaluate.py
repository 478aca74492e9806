"""segd eval (TF-free): Google's models against the bird reference reproduce the engine's pixel
agreement exactly; a daemon over HTTP scores like the local engine; masks, metric and reports
against naive references."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import pixel_iou
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from segd import cli
from segd.dataset import find_samples, read_mask, read_sample
from segd.encode import encode_mask_png
from segd.engine import Segmenter
from segd.errors import DatasetError, ModelError
from segd.evaluate import (
    EvalResult,
    HttpPredictor,
    confusion_csv,
    evaluate,
    iou_chart,
    segmenter_for_file,
)
from segd.labels import voc_palette
from segd.metrics import confusion_matrix, iou_per_class, mean_iou
from segd.variants import Manifest

DM1 = "deeplabv3_mnv2_pascal"
DM05 = "deeplabv3_mnv2_dm05_pascal"


def reference_mask(test_data: Path) -> np.ndarray:
    return cv2.imread(str(test_data / "bird_segmentation_mask.bmp"), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def bird_voc(tmp_path_factory: pytest.TempPathFactory, test_data: Path) -> Path:
    """A one-image VOC layout: the shared bird image (lossless, as .bmp) and its reference mask
    as a palette PNG."""
    root = tmp_path_factory.mktemp("bird_voc")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    shutil.copy(test_data / "bird_segmentation.bmp", root / "JPEGImages" / "bird.bmp")
    (root / "SegmentationClass" / "bird.png").write_bytes(
        encode_mask_png(reference_mask(test_data), voc_palette(256))
    )
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("bird\n")
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def naive_confusion(truth: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    for t, p in zip(truth.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if t != 255:
            cm[t, p] += 1
    return cm


# --- acceptance: Google's DM1 on the bird ----------------------------------------------------
def test_segd_eval_of_google_dm1_reproduces_the_engines_pixel_agreement_on_the_bird(
    capsys: pytest.CaptureFixture[str], bird_voc: Path, models_dir: Path, manifest: Manifest,
    test_data: Path, tmp_path: Path,
) -> None:  # fmt: skip
    code, out, err = run_cli(
        capsys, "eval", "--model", DM1, "--data", str(bird_voc), "--models-dir", str(models_dir),
        "--accelerator", "cpu", "--out", str(tmp_path / "report"), "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)

    engine = Segmenter.open(manifest.get(DM1), models_dir=models_dir, accelerator="cpu")
    mask = engine.segment((test_data / "bird_segmentation.bmp").read_bytes()).mask
    ref = reference_mask(test_data)
    agreement = float((mask == ref).mean())
    expected_cm = naive_confusion(ref, mask, 21)
    print(f"segd eval DM1 bird: pixel accuracy {doc['pixel_accuracy']:.6f} (engine {agreement:.6f}), "
          f"pixel-IoU {pixel_iou(mask, ref):.4f}, mIoU {doc['miou']:.4f}, "
          f"bird IoU {doc['classes'][3]['iou']:.4f}")  # fmt: skip

    # The same pixels agree: the numbers are identical, not just close.
    assert doc["pixel_accuracy"] == agreement
    same = round(doc["pixel_accuracy"] * doc["pixels"])
    assert same / (2 * doc["pixels"] - same) == pixel_iou(mask, ref)
    assert pixel_iou(mask, ref) > 0.95  # the bar test_engine holds DM1 to
    assert (doc["images"], doc["pixels"], doc["model"]) == (1, 513 * 513, DM1)
    iou = iou_per_class(expected_cm)
    for c in doc["classes"]:
        assert c["iou"] == (None if np.isnan(iou[c["id"]]) else iou[c["id"]])
        assert c["pixels"] == int((ref == c["id"]).sum())
    assert doc["miou"] == pytest.approx(float(np.nanmean(iou)), abs=1e-12)

    rows = list(csv.reader(io.StringIO(Path(doc["files"]["csv"]).read_text())))
    assert rows[0][1:] == list(manifest.get(DM1).labels.names)
    assert np.array_equal(np.array([[int(x) for x in r[1:]] for r in rows[1:]]), expected_cm)
    chart = cv2.imread(doc["files"]["chart"], cv2.IMREAD_COLOR)
    assert chart is not None and chart.shape[0] > 21 * 20
    assert json.loads(Path(doc["files"]["json"]).read_text())["miou"] == doc["miou"]


def test_a_model_file_scores_like_its_variant_and_an_unknown_file_is_described_from_its_tensors(
    capsys: pytest.CaptureFixture[str], bird_voc: Path, models_dir: Path, tmp_path: Path
) -> None:
    by_name = run_cli(capsys, "eval", "--model", DM05, "--data", str(bird_voc), "--models-dir",
                      str(models_dir), "--accelerator", "cpu", "--out", str(tmp_path / "a"), "--json")  # fmt: skip
    google_file = models_dir / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
    by_file = run_cli(capsys, "eval", "--model", str(google_file), "--data", str(bird_voc),
                      "--models-dir", str(models_dir), "--accelerator", "cpu", "--out", str(tmp_path / "b"), "--json")  # fmt: skip
    # Same network, different bytes (trailing padding): no manifest knows this file.
    unknown = tmp_path / "mystery.tflite"
    unknown.write_bytes(google_file.read_bytes() + bytes(64))
    described = run_cli(capsys, "eval", "--model", str(unknown), "--data", str(bird_voc),
                        "--models-dir", str(models_dir), "--out", str(tmp_path / "c"), "--json")  # fmt: skip
    docs = [json.loads(r[1]) for r in (by_name, by_file, described)]
    assert [r[0] for r in (by_name, by_file, described)] == [0, 0, 0]
    assert docs[0]["model"] == docs[1]["model"] == DM05
    assert docs[2]["model"] == "mystery"
    assert docs[2]["classes"][3]["name"] == "class_3"
    for key in ("miou", "pixel_accuracy", "pixels"):
        assert docs[0][key] == docs[1][key] == docs[2][key]
    assert [c["iou"] for c in docs[0]["classes"]] == [c["iou"] for c in docs[2]["classes"]]


def sampling_model(height: int, width: int, stride: int) -> bytes:
    """A real one-op ``.tflite``: AVERAGE_POOL_2D with a 1x1 window, stride ``stride``, SAME
    padding, uint8 in and out — its "logits" (3 classes = R, G, B) are the input pixels at
    ``(stride i, stride j)``, on a ``ceil(H / stride)`` grid like DeepLab's."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    def tensor(name: str, shape: list[int], buffer: int) -> Any:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, schema.TensorType.UINT8, buffer
        t.quantization = schema.QuantizationParametersT()
        t.quantization.scale, t.quantization.zeroPoint = [1 / 128], [128]
        return t

    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.AVERAGE_POOL_2D
    code.version = 1
    options = schema.Pool2DOptionsT()
    options.padding, options.strideH, options.strideW = schema.Padding.SAME, stride, stride
    options.filterHeight = options.filterWidth = 1
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.Pool2DOptions, options
    graph = schema.SubGraphT()
    out_hw = [-(-height // stride), -(-width // stride)]
    graph.tensors = [tensor("image", [1, height, width, 3], 1), tensor("logits", [1, *out_hw, 3], 2)]
    graph.inputs, graph.outputs, graph.operators = [0], [1], [op]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [schema.BufferT() for _ in range(3)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.mark.parametrize(("hw", "stride"), [((129, 129), 16), ((257, 321), 16), ((129, 65), 4), ((513, 513), 8)])
def test_an_unknown_file_gets_its_stride_and_corners_from_the_input_rule(
    hw: tuple[int, int], stride: int, tmp_path: Path
) -> None:
    path = tmp_path / "pool.tflite"
    path.write_bytes(sampling_model(*hw, stride))
    seg = segmenter_for_file(path)
    logits = ((hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1)
    assert tuple(seg.runner.output.shape) == (1, *logits, 3)
    assert (seg.variant.output.stride, seg.variant.output.align_corners) == (stride, True)
    # Logit (i, j) is pixel (stride i, stride j). Colour those pixels in a red/blue checkerboard
    # (green elsewhere, never sampled): with the right stride and corners the served mask is,
    # at every pixel, the colour of the nearest sampled pixel (ties at half a stride skipped).
    ii, jj = np.mgrid[0 : logits[0], 0 : logits[1]]
    image = np.zeros((*hw, 3), np.uint8)
    image[..., 1] = 120
    red = ((ii + jj) % 2 == 0)[..., None]
    image[::stride, ::stride] = np.where(red, np.array([250, 0, 0]), np.array([0, 0, 250]))
    mask = seg.segment(cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()).mask
    assert mask.shape == hw
    y, x = np.mgrid[0 : hw[0], 0 : hw[1]]
    expected = np.where((np.rint(y / stride) + np.rint(x / stride)) % 2 == 0, 0, 2)
    valid = (2 * (y % stride) != stride) & (2 * (x % stride) != stride)
    np.testing.assert_array_equal(mask[valid], expected[valid])


@pytest.mark.parametrize(("hw", "stride"), [((256, 256), 16), ((512, 512), 16), ((256, 256), 4), ((128, 129), 16)])
def test_an_unknown_file_with_an_even_input_side_is_refused(hw: tuple[int, int], stride: int, tmp_path: Path) -> None:
    # 256 -> 16 logits satisfies (256 - 1) % (16 - 1) == 0, the old "aligned" guess; but with
    # SAME padding an even side puts logit i on pixel 16 i + 15 (TF) or 16 i (this file): the
    # shapes cannot say which, and no upsampling convention fits TF's.
    path = tmp_path / "even.tflite"
    path.write_bytes(sampling_model(*hw, stride))
    with pytest.raises(ModelError, match="even"):
        segmenter_for_file(path)


def test_text_report_lists_every_class_and_the_means(
    capsys: pytest.CaptureFixture[str], bird_voc: Path, models_dir: Path, tmp_path: Path
) -> None:
    code, out, _ = run_cli(capsys, "eval", "--model", DM05, "--data", str(bird_voc), "--models-dir",
                           str(models_dir), "--accelerator", "cpu", "--out", str(tmp_path / "r"))  # fmt: skip
    assert code == 0
    assert "bird" in out and "aeroplane" in out and "n/a" in out
    assert "mIoU" in out and "pixel acc" in out
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"confusion.csv", "iou.png", "metrics.json"}


# --- over HTTP -------------------------------------------------------------------------------
def test_eval_through_a_running_daemon_equals_local_eval_and_needs_the_api_key(
    capsys: pytest.CaptureFixture[str], bird_voc: Path, models_dir: Path, tmp_path: Path
) -> None:
    from daemon import start_daemon

    d = start_daemon(tmp_path, models_dir, "--model", DM05, "--accelerator", "cpu",
                     env={"SEGD_API_KEY": "s3cret-key-for-eval"})  # fmt: skip
    try:
        code, out, err = run_cli(capsys, "eval", "--url", d.url, "--model", DM05, "--api-key",
                                 "s3cret-key-for-eval", "--data", str(bird_voc), "--out", str(tmp_path / "h"), "--json")  # fmt: skip
        assert code == 0, err
        remote = json.loads(out)
        no_key = run_cli(capsys, "eval", "--url", d.url, "--data", str(bird_voc), "--out", str(tmp_path / "x"))
        with pytest.raises(Exception, match="unknown_model"):
            HttpPredictor(d.url, "no_such_model", api_key="s3cret-key-for-eval")
    finally:
        assert d.stop() == 0
    local = json.loads(run_cli(capsys, "eval", "--model", DM05, "--data", str(bird_voc), "--models-dir",
                               str(models_dir), "--accelerator", "cpu", "--out", str(tmp_path / "l"), "--json")[1])  # fmt: skip
    assert remote["model"] == DM05
    for key in ("miou", "pixel_accuracy", "pixels", "classes"):
        assert remote[key] == local[key]
    assert no_key[0] == 2
    assert "401" in no_key[2] and "unauthorized" in no_key[2].lower()


def test_unreachable_daemon_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], bird_voc: Path, tmp_path: Path
) -> None:
    from daemon import free_port

    code, _, err = run_cli(capsys, "eval", "--url", f"http://127.0.0.1:{free_port()}", "--model", DM05,
                           "--data", str(bird_voc), "--out", str(tmp_path / "u"))  # fmt: skip
    assert code == 2
    assert "runtime_unavailable" in err and "cannot reach segd" in err


# --- masks -----------------------------------------------------------------------------------
def pillow_png(mask: np.ndarray, palette: np.ndarray, **save: object) -> bytes:
    im = Image.fromarray(mask, mode="P")
    im.putpalette(palette.astype(np.uint8).ravel().tolist())
    buf = io.BytesIO()
    im.save(buf, "PNG", **save)
    return buf.getvalue()


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    n_colours=st.integers(1, 256),
    seed=st.integers(0, 2**32 - 1),
    duplicate=st.booleans(),
)
def test_indexed_png_gives_palette_indices_even_when_colours_repeat(
    h: int, w: int, n_colours: int, seed: int, duplicate: bool
) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, n_colours, (h, w), dtype=np.uint8)
    palette = rng.integers(0, 256, (n_colours, 3))
    if duplicate:  # many tools pad palettes with black: the colour cannot tell the index
        palette[:] = 0
    assert np.array_equal(read_mask(pillow_png(mask, palette)), mask)
    assert np.array_equal(read_mask(encode_mask_png(mask, voc_palette(256))), mask)


def test_low_bit_depth_indexed_png_and_transparency_are_read_as_indices() -> None:
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 16, (33, 17), dtype=np.uint8)
    data = pillow_png(mask, voc_palette(16), bits=4, transparency=0)
    assert data[24 + 0] == 4  # IHDR bit depth: really a 4-bit file
    assert np.array_equal(read_mask(data), mask)


def test_greyscale_and_voc_coloured_masks_give_class_ids() -> None:
    mask = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    grey8 = cv2.imencode(".png", mask)[1].tobytes()
    grey16 = cv2.imencode(".png", mask.astype(np.uint16))[1].tobytes()
    bmp = cv2.imencode(".bmp", mask)[1].tobytes()
    colour = cv2.imencode(".png", voc_palette(256)[mask][:, :, ::-1].copy())[1].tobytes()
    for data in (grey8, grey16, bmp, colour):
        assert np.array_equal(read_mask(data), mask)


def test_rgb_masks_of_voc_greys_are_voc_colours_and_other_greys_are_ids() -> None:
    # VOC's class 7 (cat) is (128, 128, 128), 56 is (64, 64, 64), 63 is (192, 192, 192): a colour
    # mask of black + cat is VOC, not grey ids 0 and 128.
    voc = np.array([[0, 7, 7], [56, 63, 0]], dtype=np.uint8)
    coloured = cv2.imencode(".png", voc_palette(256)[voc][:, :, ::-1].copy())[1].tobytes()
    assert np.array_equal(read_mask(coloured), voc)
    # Greys that are not all VOC colours are ids (here 1, 2 and ignore 255), in RGB too.
    ids = np.array([[0, 1, 2], [128, 255, 0]], dtype=np.uint8)
    grey_rgb = cv2.imencode(".png", np.repeat(ids[:, :, None], 3, axis=2))[1].tobytes()
    assert np.array_equal(read_mask(grey_rgb), ids)
    # A single-channel PNG is ids whatever its values.
    single = cv2.imencode(".png", np.array([[0, 128]], np.uint8))[1].tobytes()
    assert read_mask(single).tolist() == [[0, 128]]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (cv2.imencode(".png", np.full((2, 2, 3), (1, 2, 3), np.uint8))[1].tobytes(), "outside the VOC colour map"),
        (cv2.imencode(".png", np.full((2, 2), 300, np.uint16))[1].tobytes(), "values above 255"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00", "truncated"),
        (b"not an image", "not an image"),
    ],
)  # fmt: skip
def test_unusable_masks_raise_dataset_errors(data: bytes, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        read_mask(data)


# --- metric ----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), size=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_confusion_matrix_matches_a_pixel_loop_and_skips_ignored(n: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n, size).astype(np.uint8)
    truth[rng.random(size) < 0.2] = 255
    pred = rng.integers(0, n, size).astype(np.uint8)
    cm = confusion_matrix(truth, pred, n)
    assert np.array_equal(cm, naive_confusion(truth, pred, n))
    iou = iou_per_class(cm)
    for c in range(n):
        tp = int(((truth == c) & (pred == c)).sum())
        union = int((((truth == c) | (pred == c)) & (truth != 255)).sum())
        assert (np.isnan(iou[c]) and union == 0) or iou[c] == tp / union


def test_mean_iou_skips_absent_classes_and_out_of_range_labels_are_refused() -> None:
    truth = np.array([0, 0, 1, 1, 255])
    pred = np.array([0, 1, 1, 1, 2])
    cm = confusion_matrix(truth, pred, 4)  # classes 2 and 3 never occur among labelled pixels
    assert np.allclose(iou_per_class(cm)[:2], [1 / 2, 2 / 3])
    assert np.isnan(iou_per_class(cm)[2:]).all()
    assert mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match=r"label class id\(s\) \[7\]"):
        confusion_matrix(np.array([7]), np.array([0]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


def test_confusion_csv_and_chart_show_the_numbers() -> None:
    cm = np.array([[50, 0, 0], [0, 25, 25], [0, 0, 0]])
    names = ("bg", "half", "absent")
    rows = list(csv.reader(io.StringIO(confusion_csv(cm, names))))
    assert rows == [["truth \\ prediction", "bg", "half", "absent"], ["bg", "50", "0", "0"],
                    ["half", "0", "25", "25"], ["absent", "0", "0", "0"]]  # fmt: skip
    iou = iou_per_class(cm)  # 1.0, 0.5, 0.0 (predicted but never true)
    pal = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    img = iou_chart(iou, names, palette=pal)
    # Bars in the class colour: full width for IoU 1, half for IoU 0.5, none for 0.
    red = np.all(img == (0, 0, 255), axis=2)
    green = np.all(img == (0, 255, 0), axis=2)
    blue = np.all(img == (255, 0, 0), axis=2)
    red_w = red.sum(axis=1).max()
    assert red_w > 300
    assert abs(green.sum(axis=1).max() - red_w / 2) <= 2
    assert not blue.any()


# --- datasets --------------------------------------------------------------------------------
def write_pair(root: Path, stem: str, hw: tuple[int, int], mask_hw: tuple[int, int] | None = None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / f"{stem}.jpg"), np.full((*hw, 3), 90, np.uint8))
    mask = np.zeros(mask_hw or hw, np.uint8)
    (root / "masks" / f"{stem}.png").write_bytes(encode_mask_png(mask, voc_palette(256)))


def test_folder_pair_layout_and_its_errors(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", (20, 30))
    write_pair(tmp_path, "b", (20, 30), mask_hw=(30, 20))
    assert [s.id for s in find_samples(tmp_path)] == ["a", "b"]
    rgb, mask = read_sample(find_samples(tmp_path)[0])
    assert rgb.shape == (20, 30, 3) and mask.shape == (20, 30)
    with pytest.raises(DatasetError, match=r"b: image b\.jpg is 30x20 but mask b\.png is 20x30"):
        read_sample(find_samples(tmp_path)[1])
    (tmp_path / "val.txt").write_text("a\n")
    assert [s.id for s in find_samples(tmp_path, "val")] == ["a"]
    cv2.imwrite(str(tmp_path / "images" / "c.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"missing files for 1 id\(s\): c \(mask\)"):
        find_samples(tmp_path)
    with pytest.raises(DatasetError, match="not a dataset segd reads"):
        find_samples(tmp_path / "images")


def test_voc_layout_needs_its_split_list(bird_voc: Path) -> None:
    assert [s.id for s in find_samples(bird_voc)] == ["bird"]
    with pytest.raises(DatasetError, match=r"no split file .*train\.txt"):
        find_samples(bird_voc, "train")


def test_evaluate_refuses_masks_with_ids_the_model_does_not_have(bird_voc: Path) -> None:
    samples = find_samples(bird_voc)

    def all_background(data: bytes) -> np.ndarray:
        return np.zeros((513, 513), np.uint8)

    with pytest.raises(DatasetError, match=r"bird: label class id\(s\) \[3\] outside 0\.\.2"):
        evaluate(samples, all_background, ["a", "b", "c"])
    result = evaluate(samples, all_background, [f"c{i}" for i in range(21)])
    assert isinstance(result, EvalResult) and result.iou[0] == result.pixel_accuracy


def test_segd_eval_never_imports_tensorflow(bird_voc: Path, models_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    google_file = models_dir / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
    code = (
        "import sys; from segd import cli; "
        f"rc = cli.main(['eval', '--model', {str(google_file)!r}, '--data', {str(bird_voc)!r}, "
        f"'--models-dir', {str(models_dir)!r}, '--out', {str(tmp_path / 'o')!r}, '--json']); "
        "assert rc == 0; "
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras')); "
        "assert not leaked, leaked"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == DM05
