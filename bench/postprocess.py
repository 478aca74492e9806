"""Benchmark: logits -> full-size class mask, naive (cv2 bilinear resize of the dequantized
logits + argmax) against segd's exact ``upsample_argmax``, on the real DeepLab model's logits.

    python bench/postprocess.py [--repeats 15] [--no-check]

``run()`` returns one dict per (image, output size) so a larger bench script can import it.
The naive baseline uses cv2's half-pixel geometry and multi-threaded resize; it stands for
the cost of the obvious approach, not for its exact output. ``exact`` says whether our mask
equals the float64 reference (``upsample_argmax_reference``) for that case.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from segd.postprocess import (
    SampleGrid,
    upsample_argmax,
    upsample_argmax_reference,
)

MODEL = "deeplabv3_mnv2_pascal_quant.tflite"
IMAGES = ("bird_segmentation.bmp", "bird.bmp", "cat.bmp")
SIZES: tuple[tuple[int, int], ...] = ((513, 513), (1080, 1920), (3000, 4000))  # (H, W)


def test_data_dir() -> Path:
    return Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))


def model_logits(model: Path, image: Path) -> tuple[np.ndarray, float, int]:
    """Run the model on the image stretched to its input; return the uint8 logits feeding
    its in-graph resize (the ``logits/semantic`` conv output) and their quantization."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model), experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    in_h, in_w = int(inp["shape"][1]), int(inp["shape"][2])
    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(image)
    rgb = cv2.cvtColor(
        cv2.resize(bgr, (in_w, in_h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )
    interp.set_tensor(inp["index"], rgb[None])
    interp.invoke()
    (detail,) = [
        d
        for d in interp.get_tensor_details()
        if d["name"].startswith("logits/semantic/BiasAdd") and len(d["shape"]) == 4
    ]
    scale, zero_point = detail["quantization"]
    return interp.get_tensor(detail["index"])[0].copy(), float(scale), int(zero_point)


def naive_mask(
    logits: np.ndarray, scale: float, zero_point: int, out_hw: tuple[int, int]
) -> np.ndarray:
    values = (logits.astype(np.float32) - zero_point) * np.float32(scale)
    up = cv2.resize(values, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
    return np.argmax(up, axis=2).astype(np.uint8)


def _median_ms(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
    fn()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(
    data_dir: Path | None = None,
    *,
    images: Sequence[str] = IMAGES,
    sizes: Sequence[tuple[int, int]] = SIZES,
    repeats: int = 15,
    budget_s: float = 10.0,
    check: bool = True,
) -> list[dict[str, Any]]:
    """Time naive vs ours per (image, output size); medians in ms, same process and run."""
    data = data_dir or test_data_dir()
    rows: list[dict[str, Any]] = []
    for image in images:
        logits, scale, zp = model_logits(data / MODEL, data / image)
        h, w, n_cls = logits.shape
        for out_hw in sizes:
            grid = SampleGrid.for_model((h, w), (513, 513), out_hw, align_corners=True)
            naive = functools.partial(naive_mask, logits, scale, zp, out_hw)
            ours = functools.partial(upsample_argmax, logits, grid, scale, zp)
            naive_ms = _median_ms(naive, repeats, budget_s)
            ours_ms = _median_ms(ours, repeats, budget_s)
            mask = upsample_argmax(logits, grid, scale, zp)
            exact = (
                bool(np.array_equal(mask, upsample_argmax_reference(logits, grid, scale, zp)))
                if check
                else None
            )
            rows.append(
                {
                    "image": image,
                    "logits": f"{h}x{w}x{n_cls} {logits.dtype}",
                    "out": f"{out_hw[1]}x{out_hw[0]}",
                    "naive_ms": naive_ms,
                    "ours_ms": ours_ms,
                    "speedup": naive_ms / ours_ms,
                    "exact": exact,
                    "classes_present": sorted(int(c) for c in np.unique(mask)),
                }
            )
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| image | logits | output (WxH) | naive cv2+argmax ms | segd exact ms | speed-up | = reference |",
        "|---|---|---|---:|---:|---:|:---:|",
    ]
    for r in rows:
        exact = {True: "yes", False: "NO", None: "-"}[r["exact"]]
        lines.append(
            f"| {r['image']} | {r['logits']} | {r['out']} | {r['naive_ms']:.2f} "
            f"| {r['ours_ms']:.2f} | {r['speedup']:.1f}x | {exact} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=None, help="coral test data dir")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-check", action="store_true", help="skip the float64 reference check")
    ap.add_argument("--write", action="store_true", help="update docs/PERFORMANCE.md")
    args = ap.parse_args(argv)
    rows = run(args.data, repeats=args.repeats, check=not args.no_check)
    head = (f"numpy {np.__version__}, opencv {cv2.__version__} ({cv2.getNumThreads()} threads), "
            f"{os.cpu_count()} CPUs; median of up to {args.repeats} runs; logits of Coral's DM1 model "
            "on each image (stretched to 513x513), upsampled to the output size.")  # fmt: skip
    text = f"{head}\n\n{markdown(rows)}\n\nReproduce: `.venv/bin/python bench/postprocess.py --write`"
    from bench.report import publish

    publish("Postprocess: exact upsample + argmax vs naive", text, args.write)
    return 0 if all(r["exact"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
