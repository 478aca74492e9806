"""Faults outside the request path, on a real daemon: a model file corrupted on disk (refused at
load by its checksum, named in the error, the other variants serve), SIGTERM while models load
(prompt, clean exit), a delegate that fails to load (the CPU twin serves, /models says why).

Covered elsewhere and not repeated here (docs/RELIABILITY.md lists them together):
test_edgetpu_serving.py — Edge TPU worker crash or SIGKILL mid-request (CPU twin or 503, worker
restarted, next requests fine), device unplugged (/readyz 503 and back); test_variants.py —
``models pull`` killed mid-transfer or hitting a full disk (no partial or corrupt file in
place), corrupt mirror copies; test_engine.py — corrupt model refused by checksum in-process;
test_daemon.py — SIGTERM drains requests in flight.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from conftest import read_mask_png
from daemon import Daemon, start_daemon
from test_edgetpu_serving import tpu_env, tpu_models  # noqa: F401  (tpu_models is a fixture)

from segd.engine import Segmenter
from segd.variants import Manifest

DM1 = "deeplabv3_mnv2_pascal"
DM05 = "deeplabv3_mnv2_dm05_pascal"
DM05_FILE = "deeplabv3_mnv2_dm05_pascal_quant.tflite"


def jpeg_of(test_data: Path) -> bytes:
    return cv2.imencode(".jpg", cv2.imread(str(test_data / "bird.bmp")))[1].tobytes()


def wait_loaded(d: Daemon, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    """The readiness document once loading has finished (ready or not)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = httpx.get(d.url + "/readyz", timeout=5).json()
        if doc["loaded"]:
            return doc  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, doc
        assert d.proc.poll() is None, d.output()
        time.sleep(0.05)


def copy_models(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# --- a model file corrupted on disk ----------------------------------------------------------
def test_corrupt_model_file_is_refused_at_load_naming_the_file_and_the_other_variant_serves(
    tmp_path: Path, models_dir: Path, test_data: Path, manifest: Manifest
) -> None:
    mdir = copy_models(models_dir, tmp_path / "models")
    flip_byte(mdir / DM05_FILE)
    corrupt = (mdir / DM05_FILE).read_bytes()
    d = start_daemon(tmp_path, mdir, "--model", DM1, "--model", DM05, "--accelerator", "cpu", wait="healthy")
    try:
        doc = wait_loaded(d)
        # Documented readiness: 503 until every configured variant is loaded; the body says
        # which one failed and why, the others are ready and serve.
        r = httpx.get(d.url + "/readyz")
        assert r.status_code == 503 and doc["ready"] is False
        failed = doc["models"][DM05]
        assert failed["state"] == "failed" and failed["ready"] is False
        assert DM05_FILE in failed["error"] and "sha256" in failed["error"]
        assert "segd models pull --force" in failed["error"]
        assert doc["models"][DM1]["state"] == "ready" and doc["models"][DM1]["ready"] is True

        info = httpx.get(d.url + f"/models/{DM05}").json()
        assert info["state"] == "failed" and info["backend"] is None and DM05_FILE in info["error"]

        image = jpeg_of(test_data)
        ok = httpx.post(d.url + "/segment", params={"model": DM1}, content=image,
                        headers={"content-type": "image/jpeg"}, timeout=60)  # fmt: skip
        assert ok.status_code == 200
        engine = Segmenter.open(manifest.get(DM1), models_dir=models_dir, accelerator="cpu")
        assert np.array_equal(read_mask_png(ok.content), engine.segment(image, reduce=True).mask)

        refused = httpx.post(d.url + "/segment", params={"model": DM05}, content=image,
                             headers={"content-type": "image/jpeg"}, timeout=60)  # fmt: skip
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"] == "model_not_ready" and "sha256" in refused.json()["detail"]
        assert f"{DM05}: failed to load" in d.output() and DM05_FILE in d.output()
    finally:
        assert d.stop() == 0
    assert (mdir / DM05_FILE).read_bytes() == corrupt  # left for the user to inspect, not replaced
    assert sorted(p.name for p in mdir.iterdir()) == sorted(p.name for p in models_dir.iterdir())


def test_model_corrupted_while_serving_keeps_serving_and_is_refused_at_the_next_start(
    tmp_path: Path, models_dir: Path, test_data: Path
) -> None:
    """The checked bytes are the ones loaded (read once, verified, then handed to the runtime),
    so damage on disk after start-up changes nothing until the next start, which refuses it."""
    mdir = copy_models(models_dir, tmp_path / "models")
    image = jpeg_of(test_data)
    d = start_daemon(tmp_path, mdir, "--model", DM05, "--accelerator", "cpu")
    try:
        flip_byte(mdir / DM05_FILE)
        r = httpx.post(d.url + "/segment", content=image, headers={"content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200 and httpx.get(d.url + "/readyz").status_code == 200
    finally:
        assert d.stop() == 0
    d = start_daemon(tmp_path, mdir, "--model", DM05, "--accelerator", "cpu", wait="healthy")
    try:
        doc = wait_loaded(d)
        assert doc["models"][DM05]["state"] == "failed" and "sha256" in doc["models"][DM05]["error"]
    finally:
        d.stop()


# --- SIGTERM while loading -------------------------------------------------------------------
def test_sigterm_while_a_model_downloads_exits_promptly_and_cleanly(
    tmp_path: Path, gated_mirror: tuple[str, threading.Event]
) -> None:
    url, gate = gated_mirror
    empty = tmp_path / "models"
    empty.mkdir()
    d = start_daemon(tmp_path, empty, "--model", DM05, "--accelerator", "cpu", "--mirror", url, wait="healthy")
    assert httpx.get(d.url + "/readyz").json()["models"][DM05]["state"] == "loading"
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(15)
    assert code == 0 and time.monotonic() - t0 < 5
    assert "Traceback" not in d.output()
    assert not (empty / DM05_FILE).exists()  # nothing half-written where a model is expected
    # the next start fetches it and serves
    gate.set()
    d = start_daemon(tmp_path, empty, "--model", DM05, "--accelerator", "cpu", "--mirror", url)
    try:
        assert httpx.get(d.url + "/readyz").status_code == 200
    finally:
        d.stop()


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.5])
def test_sigterm_during_model_load_and_warm_up_exits_cleanly(tmp_path: Path, models_dir: Path, delay: float) -> None:
    """Signals at different points of loading three variants (interpreter creation, warm-up,
    self-test); the daemon always exits 0 within seconds, without a traceback."""
    d = start_daemon(tmp_path, models_dir, "--model", DM1, "--model", DM05, "--model", "deeplab_edgetpu_slim_cityscapes",
                     "--accelerator", "cpu", wait="healthy")  # fmt: skip
    time.sleep(delay)
    loaded_before = httpx.get(d.url + "/readyz").json()["loaded"]
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(20)
    print(f"delay {delay}: loaded before SIGTERM {loaded_before}, exit {code} after {time.monotonic() - t0:.2f} s")
    assert code == 0 and time.monotonic() - t0 < 10
    assert "Traceback" not in d.output()


# --- a delegate that fails to load -------------------------------------------------------------
def test_delegate_failing_to_load_is_served_by_the_cpu_twin_and_reported(
    tmp_path: Path, tpu_models: Path, edgetpu_double: Path, test_data: Path  # noqa: F811
) -> None:
    env = tpu_env(edgetpu_double, mode="fail", error="USB transfer error 7 while loading firmware")
    d = start_daemon(tmp_path, tpu_models, "--model", "tpu_dm05", env=env)
    try:
        info = httpx.get(d.url + "/models/tpu_dm05").json()
        assert info["backend"] == "cpu" and "USB transfer error 7" in info["reason"]
        assert httpx.get(d.url + "/readyz").status_code == 200
        r = httpx.post(d.url + "/segment", content=(test_data / "bird.bmp").read_bytes(),
                       headers={"content-type": "image/bmp"}, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.headers["x-segd-backend"] == "cpu"
    finally:
        assert d.stop() == 0
