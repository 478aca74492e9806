"""Camera path benchmark (loopback only, bounded): frames per second segmented from a camera
(an HTTP MJPEG stream at 60 fps served here, faster than segmentation) against ``POST /segment``
of the same JPEG by one sequential client, in the same run, alternating rounds (medians) —
what reading, dropping and the source runner cost compared with an HTTP upload. Also the
daemon's RSS while the camera runs.

    python bench/sources.py [--model NAME] [--seconds 10] [--write]

Starts ``segd serve`` on free 127.0.0.1 ports (CPU backend), models from ``SEGD_MODELS_DIR``
(or the checkout's models/, fetched from ``SEGD_MODEL_MIRROR`` / the manifest URLs if missing).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import argparse
import os
import statistics
import tempfile
import time

import httpx
from camera import Camera  # tests/camera.py: the MJPEG camera the tests use
from daemon import start_daemon  # tests/daemon.py starts the real server

from bench.http_load import probe_image
from bench.report import publish
from segd.variants import default_models_dir, load_manifest, resolve_file


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def camera_rate(models_dir: Path, model: str, image: bytes, seconds: float) -> dict[str, float]:
    cam = Camera([image], fps=60)  # a fast real camera: faster than segmentation here
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "segd.toml"
        config.write_text(f'[sources.bench]\nurl = "{cam.url}/stream"\nfps = 60\nmodel = "{model}"\n')
        d = start_daemon(Path(tmp), models_dir, "--config", str(config), "--model", model, "--accelerator", "cpu")
        try:
            def frames() -> dict[str, int]:
                return dict(httpx.get(d.url + "/sources/bench", timeout=30).json()["frames"])

            while frames()["segmented"] < 5:  # warm
                time.sleep(0.2)
            a, t0, rss0 = frames(), time.perf_counter(), rss_mib(d.proc.pid)
            time.sleep(seconds)
            b, wall, rss1 = frames(), time.perf_counter() - t0, rss_mib(d.proc.pid)
        finally:
            d.stop()
            cam.stop()
    return {"segmented_per_s": (b["segmented"] - a["segmented"]) / wall,
            "received_per_s": (b["received"] - a["received"]) / wall, "rss0": rss0, "rss1": rss1}  # fmt: skip


def post_rate(models_dir: Path, model: str, image: bytes, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        d = start_daemon(Path(tmp), models_dir, "--model", model, "--accelerator", "cpu")
        try:
            with httpx.Client(base_url=d.url, timeout=60) as c:
                def post() -> None:
                    r = c.post("/segment", params={"format": "json"}, content=image, headers={"content-type": "image/jpeg"})
                    r.raise_for_status()

                for _ in range(5):
                    post()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    post()
                    n += 1
                return n / (time.perf_counter() - t0)
        finally:
            d.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="deeplabv3_mnv2_dm05_pascal")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3, help="alternating POST / camera rounds (medians reported)")
    p.add_argument("--write", action="store_true", help="update docs/PERFORMANCE.md")
    args = p.parse_args(argv)

    models_dir = Path(os.environ.get("SEGD_MODELS_DIR") or default_models_dir())
    variant = load_manifest(models_dir=models_dir).get(args.model)
    resolve_file(variant.cpu, models_dir)
    test_data = Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))
    image = probe_image(test_data if test_data.is_dir() else None)

    posts, cams = [], []
    for _ in range(args.rounds):
        posts.append(post_rate(models_dir, variant.name, image, args.seconds))
        cams.append(camera_rate(models_dir, variant.name, image, args.seconds))
    posted = statistics.median(posts)
    cam = {k: statistics.median(c[k] for c in cams) for k in cams[0]}
    text = "\n".join([
        f"Model `{variant.name}` on the CPU, the same 513x513 JPEG; {args.rounds} alternating rounds of "
        f"{args.seconds:g} s, medians. The camera sends 60 fps and the source asks for 60. Rounds: POST "
        + ", ".join(f"{x:.1f}" for x in posts) + "; camera "
        + ", ".join(f"{c['segmented_per_s']:.1f}" for c in cams) + ".",
        "",
        "| path | frames/s segmented | vs POST |",
        "|---|---:|---:|",
        f"| `POST /segment?format=json`, one sequential client | {posted:.1f} | 1.00x |",
        f"| camera source (MJPEG, newest frame wins) | {cam['segmented_per_s']:.1f} | {cam['segmented_per_s'] / posted:.2f}x |",
        "",
        f"The camera delivered {cam['received_per_s']:.0f} frames/s, the ones not segmented were dropped; "
        "the camera path has no HTTP round trip per image (the sequential client waits for each answer); "
        f"daemon RSS {cam['rss0']:.0f} -> {cam['rss1']:.0f} MiB over a round. "
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores shared with other jobs, "
        "so the rounds' spread is the measure of noise.",
        "",
        "Reproduce: `.venv/bin/python bench/sources.py --seconds 8 --write`",
    ])  # fmt: skip
    publish("Camera sources", text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
