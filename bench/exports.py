"""Export benchmark: invoke time of our int8 DeepLab v3 exports (DM1, DM0.5) against Google's
Coral CPU models — unmodified (in-graph 513x513 resize + argmax) and tail-stripped (logits out,
cut by segd.tflite.surgery) — in one run, on one runtime, with the same thread count;
plus how well each logits model's mask (segd's exact upsample + argmax) agrees with Google's
in-graph output on bird and cat, and the bird pixel-IoU against Coral's reference mask.

    python bench/exports.py [--repeats 30] [--threads N] [--write]

Our exports take minutes of TensorFlow to build, so they come from coral_deeplab.zoo's export
cache (``$CORAL_DEEPLAB_CACHE/exports``, default ``~/.cache/coral_deeplab/exports``), keyed on
the sha256 of Google's source file, the calibration pixels, the builder arguments, a hash of
the code that shapes an export (``coral_deeplab.pretrained._EXPORT_CODE``: builders, layers, weight
import, flatbuffer reader, export, and segd's decoder/resize used for calibration) and the
TensorFlow versions — a change to any of those builds a new export. They are
calibrated on 6 images made from ``bird.bmp`` and ``cityscapes_segmentation.bmp`` (as is,
mirrored, cropped); the evaluation images ``bird_segmentation.bmp`` and ``cat.bmp`` are held out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import publish
from coral_deeplab import zoo
from coral_deeplab.export import op_list
from segd.postprocess import SampleGrid, upsample_argmax
from segd.runtime import open_cpu
from segd.tflite.checker import check_model
from segd.tflite.surgery import strip_tail
from segd.variants import default_models_dir

SIZE = 513
GOOGLE = {1.0: "deeplabv3_mnv2_pascal_quant.tflite", 0.5: "deeplabv3_mnv2_dm05_pascal_quant.tflite"}
CALIBRATION = ("bird.bmp", "cityscapes_segmentation.bmp")
EVALUATION = ("bird_segmentation.bmp", "cat.bmp")


def test_data_dir() -> Path:
    return Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))


def read(path: Path, flags: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise SystemExit(f"cannot read {path}")
    return np.asarray(image)


def rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(read(path, cv2.IMREAD_COLOR)[:, :, ::-1])


def calibration_images(test_data: Path) -> list[np.ndarray]:
    out = []
    for name in CALIBRATION:
        image = rgb(test_data / name)
        h, w = image.shape[:2]
        out += [image, np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(image[h // 4 :, w // 4 :])]
    return out


def input_513(test_data: Path, name: str) -> np.ndarray:
    """The image stretched to 513x513 as raw RGB bytes: the input all models here take as is."""
    image = rgb(test_data / name)
    if image.shape[:2] != (SIZE, SIZE):
        image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return image


@dataclass
class Model:
    label: str
    data: bytes
    kind: str  # "argmax" (Google's unmodified file) or "logits"
    alpha: float
    note: str = ""


def builtin_kernels(data: bytes, threads: int) -> Any:
    """The same model in LiteRT without its default XNNPACK delegate (TFLite's own kernels)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_content=data, num_threads=threads,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )  # fmt: skip
    interp.allocate_tensors()
    return interp


def to_mask(runner: Any, raw: np.ndarray) -> np.ndarray:
    """Class map at 513x513: the model's own argmax, or segd's exact upsample + argmax."""
    if raw.ndim == 2:
        return raw.astype(np.uint8)
    grid = SampleGrid.for_model(raw.shape[:2], (SIZE, SIZE), (SIZE, SIZE), align_corners=True)
    return upsample_argmax(raw, grid, runner.output.scale, runner.output.zero_point)


def interleaved_medians(fns: list[Any], repeats: int) -> list[float]:
    """Median ms of each fn, timed round-robin so drift (thermal, other load) hits all alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t) * 1000)
    return [statistics.median(t) for t in times]


def pixel_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Coral's metric, same / (2N - same) (as tests/conftest.py, which bench cannot import
    without pytest)."""
    same = int((a == b).sum())
    return same / (2 * a.size - same)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write", action="store_true", help="update docs/PERFORMANCE.md")
    args = ap.parse_args(argv)

    test_data = test_data_dir()
    models_dir = Path(os.environ.get("SEGD_MODELS_DIR") or default_models_dir())
    calibration = calibration_images(test_data)

    models: list[Model] = []
    built_notes = []
    for alpha in (1.0, 0.5):
        tag = "DM1" if alpha == 1.0 else "DM0.5"
        full = (test_data / GOOGLE[alpha]).read_bytes()
        models.append(Model(f"Google {tag}, unmodified", full, "argmax", alpha))
        models.append(Model(f"Google {tag}, tail stripped", strip_tail(full).model_bytes, "logits", alpha))
        start = time.perf_counter()
        ours = zoo.pascal_export(
            alpha=alpha, calibration=calibration, num_calibration=len(calibration),
            models_dir=models_dir, mirror=str(test_data),
        )  # fmt: skip
        took = time.perf_counter() - start
        how = "from the cache" if ours.from_cache else f"built in {took:.0f} s"
        where = str(ours.cache_path).replace(str(Path.home()), "~", 1)
        built_notes.append(f"our {tag}: {how} (`{where}`)")
        models.append(Model(f"ours {tag} (coral_deeplab v3)", ours.tflite, "logits", alpha))

    runners = [open_cpu(m.data, num_threads=args.threads) for m in models]
    inputs = {name: input_513(test_data, name) for name in EVALUATION}
    x = inputs["bird_segmentation.bmp"]
    invoke = interleaved_medians([lambda r=r: r.run(x) for r in runners], args.repeats)
    plain = [builtin_kernels(m.data, args.threads) for m in models]
    for interp in plain:
        interp.set_tensor(interp.get_input_details()[0]["index"], x[None])
    invoke_plain = interleaved_medians([interp.invoke for interp in plain], args.repeats)
    post: list[float | None] = []
    for runner, m in zip(runners, models, strict=True):
        if m.kind == "logits":
            raw = runner.run(x)
            post.append(interleaved_medians([lambda raw=raw, r=runner: to_mask(r, raw)], args.repeats)[0])
        else:
            post.append(None)

    # Masks: every model on the same uint8 input; Google's unmodified file is the reference.
    masks = {name: [to_mask(r, r.run(img)) for r in runners] for name, img in inputs.items()}
    reference = read(test_data / "bird_segmentation_mask.bmp", cv2.IMREAD_UNCHANGED)
    google_index = {m.alpha: i for i, m in enumerate(models) if m.kind == "argmax"}

    runtime = runners[0].runtime
    plain_notes = []
    for alpha, tag in ((1.0, "DM1"), (0.5, "DM0.5")):
        by_label = {m.label: invoke_plain[i] for i, m in enumerate(models) if m.alpha == alpha}
        ours_ms = by_label[f"ours {tag} (coral_deeplab v3)"]
        vs = []
        for kind in ("tail stripped", "unmodified"):
            change = 100 * (ours_ms / by_label[f"Google {tag}, {kind}"] - 1)
            vs.append(f"{abs(change):.0f} % {'longer' if change >= 0 else 'shorter'} than Google's {kind} file")
        plain_notes.append(f"our {tag} takes {' and '.join(vs)}")
    load = os.getloadavg()[0]
    lines = [
        f"{runtime}, CPU, {args.threads} threads, the same process and run for every row; "
        f"medians of {args.repeats} invokes, timed round-robin, on `bird_segmentation.bmp` at 513x513 "
        f"(1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores; other work on the "
        "machine inflates all rows alike, so compare rows, not runs).",
        "",
        "| model | ops | Edge TPU check | output | invoke (ms) | + segd upsample/argmax (ms) | total to a 513x513 mask (ms) | invoke, no XNNPACK (ms) | agreement with Google, bird | agreement, cat | bird pixel-IoU vs reference |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (m, runner) in enumerate(zip(models, runners, strict=True)):
        report = check_model(m.data)
        check = f"{report.n_mapped}/{report.n_ops} mapped"
        if report.stop_index is not None:
            check += f", stops at {report.rows[report.stop_index].op}"
        shape = "x".join(str(d) for d in runner.output.shape)
        out = f"{runner.output.dtype.name} {shape}"
        g = google_index[m.alpha]
        agree = [float(np.mean(masks[name][i] == masks[name][g])) for name in EVALUATION]
        iou = pixel_iou(masks["bird_segmentation.bmp"][i], reference)
        total = invoke[i] + (post[i] or 0.0)
        post_text = f"{post[i]:.2f}" if post[i] is not None else "in graph"
        ref = "(reference)" if i == g else None
        lines.append(
            f"| {m.label} | {len(op_list(m.data))} | {check} | {out} | {invoke[i]:.1f} | {post_text} | "
            f"**{total:.1f}** | {invoke_plain[i]:.1f} | {ref or f'{agree[0]:.4f}'} | {ref or f'{agree[1]:.4f}'} | {iou:.4f} |"
        )
    lines += [
        "",
        "Agreement = fraction of the 513x513 pixels whose class equals the unmodified Google file's "
        "in-graph argmax at the same depth multiplier; the logits models go through segd's exact "
        "align-corners upsample + argmax (the manifest's `align_corners = true`). Our exports are "
        "calibrated on 6 images derived from `bird.bmp` and `cityscapes_segmentation.bmp`; the two "
        "evaluation images are not among them. " + "; ".join(built_notes) + ".",
        "`invoke` is LiteRT as segd runs it (default XNNPACK delegate); `no XNNPACK` is the same "
        "file on TFLite's built-in kernels. Our int8 (per-channel) exports gain far more from "
        "XNNPACK than Google's uint8 (per-tensor) files; without it " + "; ".join(plain_notes)
        + " (the unmodified file's time includes its in-graph 513x513 resize + argmax). So the "
        "CPU speed-up depends on the runtime's kernels: measure on the target (e.g. a Pi) "
        "before relying on it.",
        "The Edge TPU column is the static checker's prediction (no device and no "
        "edgetpu_compiler here): on Google's files the TPU segment stops at the image-pooling "
        "resize, on ours the checker predicts every op maps.",
        "",
        "Reproduce: `.venv/bin/python bench/exports.py --write` (the first run builds the two "
        "exports with TensorFlow, later runs reuse the cache).",
    ]
    text = "\n".join(lines)
    publish("Exports vs Google's models", text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
