"""Training end to end on a synthetic VOC-layout dataset: fine-tuning Google's PASCAL DM0.5 to 3
new classes lowers the loss and lifts val mIoU far above chance; the int8 export maps 100 % to
the Edge TPU, is published, loads in segd and is served over HTTP by the real daemon. Plus the
parts: seeded/resumable data stream, DeepLab augmentation, the ignore-255 loss, the metric,
freezing, interrupted-and-resumed runs (through ``segd train``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")
cv2 = pytest.importorskip("cv2")

from conftest import read_mask_png  # noqa: E402

from coral_deeplab import data, export, losses, metrics, train, zoo  # noqa: E402
from coral_deeplab.applications import CoralDeepLabV3  # noqa: E402
from coral_deeplab.weights import load_pascal_voc  # noqa: E402
from segd import cli  # noqa: E402
from segd.dataset import find_samples, read_mask  # noqa: E402
from segd.encode import encode_mask_png  # noqa: E402
from segd.errors import DatasetError  # noqa: E402
from segd.evaluate import evaluate  # noqa: E402
from segd.labels import voc_palette  # noqa: E402
from segd.metrics import confusion_matrix, iou_per_class, mean_iou  # noqa: E402
from segd.variants import load_manifest  # noqa: E402

LABELS = ["background", "disc", "box"]
NAME = "shapes_dm05"
SIZE = 129  # 16 * 8 + 1: Google's align-corners geometry, 9x9 logits
STEPS = 100


# --- synthetic dataset -----------------------------------------------------------------------
def shapes_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Warm discs (class 1) and cool rotated boxes (class 2) on a desaturated textured
    background (blurred noise + stripes); the label has a 255 band on object borders like VOC."""
    base = rng.uniform(60, 200, size=3)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w, 3)).astype(np.float32), (0, 0), rng.uniform(1.5, 4))
    noise /= noise.std() + 1e-6
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(0.15, 0.6))[..., None]
    img = base + 18 * noise + 20 * stripes * rng.uniform(0.3, 1.0, size=3)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + 0.35 * (img - grey)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 3))
        r = int(rng.uniform(0.12, 0.25) * min(h, w))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        shape = np.zeros((h, w), np.uint8)
        if cls == 1:
            cv2.circle(shape, (cx, cy), r, 1, -1)
            colour = np.array([rng.uniform(180, 255), rng.uniform(20, 110), rng.uniform(0, 60)])
        else:
            box = cv2.boxPoints(((cx, cy), (2 * r, 1.4 * r), float(rng.uniform(0, 90))))
            cv2.fillPoly(shape, [box.astype(np.int32)], 1)
            colour = np.array([rng.uniform(0, 60), rng.uniform(60, 160), rng.uniform(180, 255)])
        sel = shape.astype(bool)
        img[sel] = colour + 12 * noise[sel]
        mask[sel] = cls
    label = mask.copy()
    label[cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0] = 255
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_shapes_voc(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(n_train + n_val):
        img, label = shapes_image(rng, int(rng.integers(96, 160)), int(rng.integers(96, 160)))
        sid = f"shape_{i:04d}"
        cv2.imwrite(str(root / "JPEGImages" / f"{sid}.jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        (root / "SegmentationClass" / f"{sid}.png").write_bytes(encode_mask_png(label, voc_palette(256)))
        splits["train" if i < n_train else "val"].append(sid)
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


def chance_miou(val_root: Path) -> dict[str, float]:
    """mIoU of label-blind predictors on the val labels (their expectation for the random ones):
    always the majority class; uniformly random; random with the class frequencies."""
    counts = np.zeros(len(LABELS))
    for sample in find_samples(val_root, "val"):
        m = read_mask(sample.mask.read_bytes())
        counts += np.bincount(m[m != 255], minlength=len(LABELS))[: len(LABELS)]
    p = counts / counts.sum()
    k = len(LABELS)
    return {
        "majority": float(p.max() / k),  # IoU p_max for that class, 0 for the others
        "uniform": float(np.mean(p / (k * p + 1 - p))),
        "prior": float(np.mean(p / (2 - p))),
    }


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_voc(tmp_path_factory.mktemp("shapes"), n_train=48, n_val=16)


@pytest.fixture(scope="module")
def source(models_dir: Path, test_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Where train() finds Google's PASCAL DM0.5 file, and a private weights cache."""
    return {
        "source_models_dir": str(models_dir),
        "mirror": str(test_data),
        "weights_cache": str(tmp_path_factory.mktemp("weights_cache")),
    }


@pytest.fixture(scope="module")
def trained(shapes: Path, source: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("trained")
    return train.train(
        shapes, name=NAME, out_dir=root / "run", progress=False, alpha=0.5, input_size=SIZE,
        batch_size=8, steps=STEPS, eval_every=50, checkpoint_every=50, num_calibration=16,
        models_dir=str(root / "models"), **source,
    )  # fmt: skip


def published_dir(trained: Any) -> Path:
    return Path(trained.config.models_dir)


# --- acceptance ------------------------------------------------------------------------------
def test_fine_tuning_lowers_the_loss_and_lifts_val_miou_far_above_chance(trained: Any, shapes: Path) -> None:
    chance = chance_miou(shapes)
    level = max(chance.values())
    curve = [float(np.mean([v for _, v in trained.losses[i : i + 10]])) for i in range(0, STEPS, 10)]
    print(f"\ntrained {STEPS} steps in {trained.seconds:.1f} s (incl. export); loss per 10 steps: "
          + " ".join(f"{v:.3f}" for v in curve))  # fmt: skip
    print(f"val mIoU: before {trained.miou_before:.4f}, "
          + ", ".join(f"step {s}: {m:.4f}" for s, m, _ in trained.evals[1:])
          + f"; per class at the end {trained.evals[-1][2]}")  # fmt: skip
    print(f"chance levels: {chance} -> compared with {level:.4f}")
    assert [s for s, _, _ in trained.evals] == [0, 50, STEPS]
    assert [s for s, _ in trained.losses] == list(range(1, STEPS + 1))
    assert curve[-1] < 0.4 * curve[0]
    assert trained.miou_after > level + 0.35
    assert trained.miou_after > trained.miou_before + 0.3
    assert min(trained.evals[-1][2]) > 0.5  # every class, not just the background
    history = [json.loads(line) for line in (trained.out_dir / "history.jsonl").read_text().splitlines()]
    assert history[-1]["val_miou"] == trained.miou_after
    assert sorted(p.name for p in (trained.out_dir / "checkpoints").glob("ckpt-*.index")) == [
        "ckpt-100.index", "ckpt-50.index"]  # fmt: skip


def test_export_is_predicted_to_map_fully_to_the_edge_tpu_and_is_published_for_segd(trained: Any) -> None:
    assert trained.check.fully_mapped, zoo.describe_report(trained.check)
    assert export.export_problems(trained.tflite) == []
    assert export.input_quantization(trained.tflite) == (1 / 128, 128, "uint8")
    pub = trained.published
    assert pub.report.fully_mapped
    assert pub.cpu_path.read_bytes() == trained.tflite == trained.tflite_path.read_bytes()
    if shutil.which("edgetpu_compiler") is None:
        assert pub.edgetpu_path is None and "not on PATH" in pub.compile_skipped_reason
    variant = load_manifest(models_dir=published_dir(trained)).get(NAME)
    assert variant.labels.names == tuple(LABELS)
    assert variant.input.shape == (1, SIZE, SIZE, 3)
    assert (variant.output.kind, variant.output.shape, variant.output.stride) == ("logits", (1, 9, 9, 3), 16)
    assert variant.output.align_corners is True
    print(f"\nexport: {len(trained.tflite)} bytes, {zoo.describe_report(trained.check)}")


def test_published_model_segments_in_segd_and_is_served_over_http(
    trained: Any, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon import start_daemon

    mdir = published_dir(trained)
    segmenter = zoo.from_precompiled(NAME, models_dir=mdir, accelerator="cpu")
    samples = find_samples(shapes, "val")
    local = evaluate(samples, lambda b: segmenter.segment(b).mask, LABELS, model=NAME)

    # The single-image check uses the val image with the largest shapes: at 129 px the logits
    # are 9x9 (stride 16), too coarse for a half-hidden 20 px disc. The eval over HTTP below
    # scores every val image.
    def smallest_object(sample: Any) -> tuple[int, int]:
        counts = np.bincount(read_mask(sample.mask.read_bytes()).ravel(), minlength=256)[1:3]
        return int((counts > 0).sum()), int(counts[counts > 0].min())

    chosen = max(samples, key=smallest_object)
    d = start_daemon(tmp_path, mdir, "--model", NAME, "--accelerator", "cpu")
    try:
        image = chosen.image.read_bytes()
        with d.client() as c:
            r = c.post("/segment", params={"model": NAME, "format": "png"}, content=image,
                       headers={"content-type": "image/jpeg"})  # fmt: skip
        assert r.status_code == 200, r.text
        served = read_mask_png(r.content)
        truth = read_mask(chosen.mask.read_bytes())
        code = cli.main(["eval", "--url", d.url, "--model", NAME, "--data", str(shapes),
                         "--out", str(tmp_path / "eval"), "--json"])  # fmt: skip
        remote = json.loads(capsys.readouterr().out)
    finally:
        assert d.stop() == 0
    assert code == 0
    assert served.shape == truth.shape
    assert np.array_equal(served, segmenter.segment(image).mask)
    one = iou_per_class(confusion_matrix(truth, served, 3))
    print(f"\nserved mask of {chosen.id}: IoU per class {np.round(one, 3).tolist()}; "
          f"int8 val mIoU local {local.miou:.4f}, over HTTP {remote['miou']:.4f}, "
          f"float val mIoU {trained.miou_after:.4f}")  # fmt: skip
    present = np.bincount(truth[truth != 255], minlength=3) > 0  # a class absent from the
    assert present.sum() == 3 and one[present].min() > 0.6  # truth scores 0 on any false pixel
    assert remote["miou"] == local.miou
    assert local.miou > max(chance_miou(shapes).values()) + 0.3
    assert local.miou > trained.miou_after - 0.1  # int8 costs little


# --- interrupted runs, freezing, segd train -----------------------------------------------------
def test_an_interrupted_run_resumes_exactly_and_the_backbone_stays_frozen_while_asked(
    shapes: Path, source: dict[str, str], models_dir: Path, test_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    small = {"input_size": 65, "batch_size": 4, "steps": 4, "freeze_backbone": 3,
             "eval_every": 0, "checkpoint_every": 0, "export": False}  # fmt: skip
    monkeypatch.setenv("CORAL_DEEPLAB_CACHE", source["weights_cache"])
    out = tmp_path / "interrupted"
    code = cli.main(["train", str(shapes), "--name", "resumed", "--out", str(out), "--input-size", "65",
                     "--batch-size", "4", "--steps", "4", "--stop-at", "2", "--freeze-backbone", "3",
                     "--eval-every", "0", "--checkpoint-every", "0", "--no-export", "--quiet",
                     "--models-dir", str(models_dir), "--mirror", str(test_data)])  # fmt: skip
    assert code == 0
    assert "stopped at step 2 of 4; continue with --resume" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").glob("*.index")] == ["ckpt-2.index"]

    imported = CoralDeepLabV3((65, 65, 3), alpha=0.5, n_classes=3)
    load_pascal_voc(imported, alpha=0.5, skip_logits=True, models_dir=models_dir,
                    cache=Path(source["weights_cache"]))  # fmt: skip
    halfway = CoralDeepLabV3((65, 65, 3), alpha=0.5, n_classes=3)
    tf.train.Checkpoint(model=halfway).restore(str(out / "checkpoints" / "ckpt-2")).expect_partial()

    def w(model: Any, layer: str, i: int = 0) -> np.ndarray:
        return np.asarray(model.get_layer(layer).get_weights()[i])

    # Two frozen steps: the backbone is Google's, the head has moved.
    for layer in ("Conv", "expanded_conv_5_expand", "expanded_conv_16_project"):
        assert np.array_equal(w(halfway, layer), w(imported, layer))
    assert not np.array_equal(w(halfway, "aspp0"), w(imported, "aspp0"))

    with pytest.raises(ValueError, match=r"different settings \(alpha: 0\.5 -> 1\.0\)"):
        train.train(shapes, name="resumed", out_dir=out, progress=False, resume=True, **{**small, "alpha": 1.0}, **source)
    # Anything that changes the stream of batches or the optimizer is another run, not this one.
    copy = shutil.copytree(shapes, tmp_path / "same_images_elsewhere")
    for data_dir, change, shown in [
        (shapes, {"flip": False}, "flip: True -> False"), (shapes, {"min_scale": 0.75}, "min_scale: 0.5 -> 0.75"),
        (shapes, {"scale_step": 0.5}, "scale_step"), (shapes, {"optimizer": "sgd"}, "optimizer: 'adam' -> 'sgd'"),
        (shapes, {"train_split": "val"}, "train_split"), (copy, {}, "data: "),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"different settings \\({shown}"):
            train.train(data_dir, name="resumed", out_dir=out, progress=False, resume=True, **{**small, **change}, **source)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train.train(shapes, name="resumed", out_dir=out, progress=False, **small, **source)

    # A run killed while writing its log leaves a partial last line: resuming drops it.
    with (out / "history.jsonl").open("a") as log:
        log.write('{"step": 2, "loss": 0.')
    resumed = train.train(shapes, name="resumed", out_dir=out, progress=False, resume=True, **small, **source)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2, 4, 4]  # val before each part, last loss window, val at the end
    # The uninterrupted run also exports at another input size (97 = 16 * 6 + 1) unpublished.
    straight = train.train(shapes, name="straight", out_dir=tmp_path / "straight", progress=False,
                           **{**small, "export": True}, export_size=97, publish=False,
                           num_calibration=8, **source)  # fmt: skip
    print(f"\nresumed losses {resumed.losses}, uninterrupted {straight.losses}")
    assert resumed.start_step == 2
    assert [s for s, _ in resumed.losses] == [3, 4]
    assert np.allclose([v for _, v in resumed.losses], [v for _, v in straight.losses[2:]], rtol=1e-4)
    end_r = CoralDeepLabV3((65, 65, 3), alpha=0.5, n_classes=3, weights=str(resumed.weights_path))
    end_s = CoralDeepLabV3((65, 65, 3), alpha=0.5, n_classes=3, weights=str(straight.weights_path))
    for a, b in zip(end_r.get_weights(), end_s.get_weights(), strict=True):
        assert np.allclose(a, b, atol=1e-5)
    # Step 4 ran unfrozen: the backbone moved, but BatchNorm statistics stayed (batch of 4).
    assert not np.array_equal(w(end_s, "expanded_conv_5_expand"), w(imported, "expanded_conv_5_expand"))
    assert np.array_equal(w(end_s, "expanded_conv_5_expand_BN", 2), w(imported, "expanded_conv_5_expand_BN", 2))

    # Export at 97x97: the trained weights carry over; the int8 file is Edge-TPU clean and its
    # logits agree with the float model's at that size.
    assert straight.published is None and straight.check.fully_mapped
    assert export.export_problems(straight.tflite) == []
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=straight.tflite)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert list(inp["shape"]) == [1, 97, 97, 3] and list(out["shape"]) == [1, 7, 7, 3]
    rgb = cv2.resize(cv2.imread(str(find_samples(shapes, "val")[0].image))[:, :, ::-1], (97, 97))
    interp.set_tensor(inp["index"], np.ascontiguousarray(rgb)[None])
    interp.invoke()
    scale, zero = out["quantization"]
    int8_logits = (interp.get_tensor(out["index"])[0].astype(np.float32) - zero) * scale
    at_97 = CoralDeepLabV3((97, 97, 3), alpha=0.5, n_classes=3, weights=str(straight.weights_path))
    float_logits = at_97(((rgb.astype(np.float32) - 128) / 128)[None], training=False).numpy()[0]
    halfway_97 = CoralDeepLabV3((97, 97, 3), alpha=0.5, n_classes=3)
    halfway_97.set_weights(halfway.get_weights())
    before = halfway_97(((rgb.astype(np.float32) - 128) / 128)[None], training=False).numpy()[0]

    def relative(logits: np.ndarray) -> np.ndarray:  # what decides the mask: class differences
        return logits - logits.mean(axis=-1, keepdims=True)

    quant_error = float(np.abs(relative(int8_logits) - relative(float_logits)).mean())
    offset = float(np.abs(int8_logits - float_logits).mean())
    two_steps = float(np.abs(relative(before) - relative(float_logits)).mean())
    print(f"export at 97: int8 vs float logits {quant_error:.4f} (with common offset {offset:.4f}), "
          f"float step 2 vs step 4 {two_steps:.4f}")  # fmt: skip
    assert quant_error < 0.5 * two_steps  # the file holds the step-4 weights, not older ones


# --- parts -----------------------------------------------------------------------------------
def test_the_data_stream_is_a_pure_function_of_seed_and_step(shapes: Path) -> None:
    train_s, _ = data.split_samples(shapes)

    def batches(seed: int, start: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        ds = data.train_dataset(train_s, (65, 65), 4, n_classes=3, seed=seed, start_step=start)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]

    first, again, later, other = batches(0, 0, 14), batches(0, 0, 14), batches(0, 12, 2), batches(1, 0, 1)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    # Steps 12-13 cross the epoch boundary (48 images = 12 batches of 4): skipping still agrees.
    for (x1, y1), (x2, y2) in zip(first[12:], later, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(first[0][0], other[0][0])
    x, y = first[0]
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((4, 65, 65, 3), np.float32, (4, 65, 65), np.uint8)
    assert x.min() >= -1 and x.max() <= 127 / 128
    assert set(np.unique(y)) <= {0, 1, 2, 255}


def test_augmentation_pads_grey_with_ignore_and_flips_image_and_label_together() -> None:
    h, w = 40, 50
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = 200  # bright left half
    label = np.ones((h, w), np.uint8)
    label[:, : w // 2] = 2
    flipped_seen = straight_seen = False
    for seed in range(40):
        x, y = data.augment_pair(tf.constant(image), tf.constant(label), (65, 65),
                                 data.Augment(0.5, 2.0), tf.constant([7, seed]))  # fmt: skip
        x, y = x.numpy(), y.numpy()
        pad = y == 255
        if pad.any():  # padding is grey 128 = 0.0 after normalisation, never labelled
            assert np.all(x[pad] == 0.0)
        # Image and label move together: class 2 where the bright half is (bilinear blur
        # only touches the one or two columns at the edge between the halves).
        if (y == 2).any():
            assert x[y == 2].mean() > 0.45
        if (y == 1).any():
            assert x[y == 1].mean() < -0.85
        cols = np.where((y == 2).any(axis=0))[0]
        if cols.size and (y == 1).any():
            right = cols.min() > np.where((y == 1).any(axis=0))[0].min()
            flipped_seen |= right
            straight_seen |= not right
    assert flipped_seen and straight_seen
    scales = data.Augment().scales()
    assert scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]


def test_loss_is_cross_entropy_over_labelled_pixels_only() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 9, 9)).astype(np.uint8)
    labels[:, :4] = 255
    ours = float(losses.masked_cross_entropy(labels, logits, align_corners=True))  # 9 -> 9: identity
    valid = labels != 255
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -np.mean(np.take_along_axis(logp, labels.astype(int)[..., None] % 3, -1)[..., 0][valid])
    assert ours == pytest.approx(ref, rel=1e-5)
    changed = logits.copy()
    changed[:, :4] = 100.0  # logits under ignored labels do not matter
    assert float(losses.masked_cross_entropy(labels, changed, align_corners=True)) == pytest.approx(ours, rel=1e-6)
    assert float(losses.masked_cross_entropy(np.full((1, 9, 9), 255, np.uint8), logits[:1], align_corners=True)) == 0.0
    keras_loss = losses.SegmentationLoss(align_corners=True)
    assert float(keras_loss(labels, logits)) == pytest.approx(ours, rel=1e-6)


def test_keras_miou_metric_equals_segd_eval_on_the_same_pixels() -> None:
    rng = np.random.default_rng(5)
    metric = metrics.SegmentationMeanIoU(4, align_corners=True)
    total = np.zeros((4, 4), np.int64)
    for _ in range(3):
        logits = rng.normal(size=(2, 17, 17, 4)).astype(np.float32)
        labels = rng.integers(0, 4, (2, 33, 33)).astype(np.uint8)
        labels[rng.random(labels.shape) < 0.1] = 255
        metric.update_state(labels, logits)
        up = tf.compat.v1.image.resize_bilinear(logits, (33, 33), align_corners=True).numpy()
        total += confusion_matrix(labels, up.argmax(-1), 4)
    assert np.array_equal(metric.confusion, total)
    assert float(metric.result()) == pytest.approx(mean_iou(total), rel=1e-6)
    assert np.allclose(metric.per_class(), iou_per_class(total))


def test_labels_come_from_labels_txt_else_from_the_masks_and_out_of_range_ids_are_named(
    shapes: Path, tmp_path: Path
) -> None:
    samples, _ = data.split_samples(shapes)
    assert train.resolve_labels(train.TrainConfig(data=str(shapes), name="x"), samples) == LABELS
    copy = tmp_path / "nolabels"
    shutil.copytree(shapes, copy)
    (copy / "labels.txt").unlink()
    samples, _ = data.split_samples(copy)
    assert train.resolve_labels(train.TrainConfig(data=str(copy), name="x"), samples) == [
        "background", "class_1", "class_2"]  # fmt: skip
    with_box = next(s for s in samples if 2 in read_mask(s.mask.read_bytes()))
    with pytest.raises(DatasetError, match=rf"{with_box.id}: mask {with_box.id}\.png holds class id\(s\) \[2\]"):
        data.load_pair(with_box, 2)


def test_folder_pairs_without_lists_hold_out_a_seeded_validation_share(tmp_path: Path, shapes: Path) -> None:
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for sample in find_samples(shapes, "train")[:20]:
        shutil.copy(sample.image, root / "images" / sample.image.name)
        shutil.copy(sample.mask, root / "masks" / sample.mask.name)
    tr, va = data.split_samples(root, val_fraction=0.2, seed=4)
    assert (len(tr), len(va)) == (16, 4)
    assert not {s.id for s in tr} & {s.id for s in va}
    assert data.split_samples(root, val_fraction=0.2, seed=4) == (tr, va)
    assert data.split_samples(root, val_fraction=0.2, seed=5)[1] != va


def test_bad_samples_stop_training_with_a_dataset_error_naming_the_file(
    shapes: Path, source: dict[str, str], tmp_path: Path
) -> None:
    samples, _ = data.split_samples(shapes)
    with pytest.raises(DatasetError, match=r"mask shape_\d+\.png holds class id\(s\) \[2\]"):
        data.check_masks(samples, 2)
    # Inside tf.data the error arrives wrapped in a TensorFlow error; it is recovered.
    with pytest.raises(tf.errors.OpError) as info:
        next(iter(data.train_dataset(samples, (65, 65), 4, n_classes=2)))
    recovered = data.dataset_error(info.value)
    assert isinstance(recovered, DatasetError) and "holds class id(s) [2]" in recovered.detail

    root = tmp_path / "truncated"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for sample in samples[:4]:
        (root / "images" / sample.image.name).write_bytes(sample.image.read_bytes()[:600])
        shutil.copy(sample.mask, root / "masks" / sample.mask.name)
    with pytest.raises(DatasetError, match=r"shape_\d+: JPEG data ends inside a header segment"):
        train.train(root, name="broken", out_dir=tmp_path / "run", progress=False, input_size=65,
                    batch_size=2, steps=2, val_fraction=0, eval_before=False, export=False, **source)  # fmt: skip


def test_v3plus_from_scratch_trains_batchnorm_statistics(shapes: Path, tmp_path: Path) -> None:
    from coral_deeplab.applications import CoralDeepLabV3Plus

    result = train.train(shapes, name="scratch", out_dir=tmp_path / "scratch", progress=False,
                         architecture="v3plus", weights=None, input_size=65, batch_size=4, steps=2,
                         eval_before=False, eval_every=0, checkpoint_every=0, export=False)  # fmt: skip
    assert result.config.batchnorm_trains() and result.config.lr() == 1e-3
    assert all(np.isfinite(v) for _, v in result.losses) and len(result.losses) == 2
    model = CoralDeepLabV3Plus((65, 65, 3), alpha=0.5, n_classes=3, weights=str(result.weights_path))
    assert model.output_shape == (None, 17, 17, 3)
    fresh = CoralDeepLabV3Plus((65, 65, 3), alpha=0.5, n_classes=3)
    for name in ("Conv_BN", "decoder_conv0_pointwise_BN"):  # moving means moved off their init
        assert not np.allclose(model.get_layer(name).get_weights()[2], fresh.get_layer(name).get_weights()[2])
    assert result.evals and result.evals[-1][0] == 2
