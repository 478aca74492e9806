"""HTTP benchmark (loopback only, bounded): throughput and p50/p99 latency of ``POST /segment``
with 1, 4 and 16 concurrent clients, against the engine's own end-to-end rate measured in the
same run — how much HTTP, multipart-free raw upload, queueing and PNG encoding cost.

    python bench/http_load.py [--model NAME] [--requests 400] [--write]

Starts ``segd serve`` on a free 127.0.0.1 port (CPU backend), models from ``SEGD_MODELS_DIR``
(or the checkout's models/, fetched from ``SEGD_MODEL_MIRROR`` / the manifest URLs if missing).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

import argparse
import tempfile
import time
from typing import Any

import cv2

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from daemon import start_daemon  # tests/daemon.py starts the real server

from bench.load import closed_loop
from bench.report import publish
from segd.engine import Segmenter
from segd.variants import default_models_dir, load_manifest, resolve_file


def probe_image(test_data: Path | None) -> bytes:
    """A 513x513 JPEG: Coral's bird image when available, else a synthetic one."""
    if test_data is not None and (test_data / "bird_segmentation.bmp").is_file():
        bgr = cv2.imread(str(test_data / "bird_segmentation.bmp"))
        if bgr is None:
            raise SystemExit(f"cannot read {test_data / 'bird_segmentation.bmp'}")
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    from segd.synthetic import synthetic_jpeg

    return synthetic_jpeg((513, 513))


def engine_rate(seg: Segmenter, image: bytes, seconds: float = 5.0) -> float:
    """Images per second of ``Segmenter.segment`` (decode -> mask), one caller, in-process."""
    for _ in range(5):
        seg.segment(image)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        seg.segment(image)
        n += 1
    return n / (time.perf_counter() - t0)


def load(url: str, image: bytes, clients: int, total: int, model: str) -> dict[str, Any]:
    return closed_loop(url, image, clients, per_client=max(1, total // clients), params={"model": model})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=400, help="requests per client count")
    p.add_argument("--write", action="store_true", help="update docs/PERFORMANCE.md")
    args = p.parse_args(argv)

    import os

    models_dir = Path(os.environ.get("SEGD_MODELS_DIR") or default_models_dir())
    manifest = load_manifest(models_dir=models_dir)
    variant = manifest.get(args.model)
    resolve_file(variant.cpu, models_dir)
    test_data = Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))
    image = probe_image(test_data if test_data.is_dir() else None)

    seg = Segmenter.open(variant, models_dir=models_dir, accelerator="cpu")
    rate = engine_rate(seg, image)
    e2e_ms = 1000 / rate
    seg.close()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp), models_dir, "--model", variant.name, "--accelerator", "cpu",
                              env={"SEGD_QUEUE_SIZE": "64"})  # fmt: skip
        try:
            load(daemon.url, image, 2, 20, variant.name)  # warm-up
            for clients in (1, 4, 16):
                rows.append(load(daemon.url, image, clients, args.requests, variant.name))
        finally:
            daemon.stop()

    lines = [
        f"Model `{variant.name}` on the CPU; 513x513 JPEG in, indexed PNG mask out; engine end-to-end "
        f"(decode -> mask, in-process, one caller) {e2e_ms:.1f} ms = {rate:.1f} images/s.",
        "",
        "| clients | requests | errors | throughput (req/s) | vs engine rate | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['throughput']:.1f} | "
            f"{r['throughput'] / rate:.2f}x | {r['p50']:.1f} | {r['p99']:.1f} |"
        )
    lines += ["", "Reproduce: `.venv/bin/python bench/http_load.py --write`"]
    text = "\n".join(lines)
    publish("HTTP throughput", text, args.write)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
