"""The daemon over real HTTP: a real uvicorn server on 127.0.0.1, real models, real clients."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from conftest import read_mask_png
from daemon import Daemon, start_daemon

from segd.engine import Segmenter
from segd.variants import Manifest

DM1 = "deeplabv3_mnv2_pascal"
DM05 = "deeplabv3_mnv2_dm05_pascal"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path_factory.mktemp("daemon"), models_dir,
        "--model", DM1, "--model", DM05, "--accelerator", "cpu",
        env={"SEGD_MAX_PIXELS": "20000000", "SEGD_QUEUE_SIZE": "64"},
    )  # fmt: skip
    yield d
    d.stop()


@pytest.fixture(scope="module")
def engines(manifest: Manifest, models_dir: Path) -> dict[str, Segmenter]:
    return {n: Segmenter.open(manifest.get(n), models_dir=models_dir, accelerator="cpu") for n in (DM1, DM05)}


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["detail"]
    return str(body["error"])


def png_bytes(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


# --- formats -------------------------------------------------------------------------------
def test_png_mask_is_indexed_at_original_size_and_equals_the_engine(
    daemon: Daemon, engines: dict[str, Segmenter], test_data: Path
) -> None:
    data = (test_data / "bird.bmp").read_bytes()
    with daemon.client() as c:
        r = c.post("/segment", files={"image": ("bird.bmp", data, "image/bmp")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-segd-model"] == DM1
    assert r.headers["x-segd-backend"] == "cpu"
    assert {"decode", "invoke", "postprocess", "total"} <= set(json.loads(r.headers["x-segd-timings"]))
    assert "invoke;dur=" in r.headers["server-timing"]
    summary = json.loads(r.headers["x-segd-summary"])
    assert (summary["width"], summary["height"], summary["backend"]) == (512, 343, "cpu")
    mask = read_mask_png(r.content)
    assert mask.shape == (343, 512)
    counts = np.bincount(mask.ravel(), minlength=21)
    assert {c["id"]: c["pixels"] for c in summary["classes"]} == {i: int(n) for i, n in enumerate(counts) if n}
    assert np.array_equal(mask, engines[DM1].segment(data).mask)


def test_raw_body_json_summary_names_classes_with_areas(daemon: Daemon, test_data: Path) -> None:
    data = (test_data / "bird_segmentation.bmp").read_bytes()
    with daemon.client() as c:
        r = c.post("/segment", params={"format": "json", "model": DM05}, content=data,
                   headers={"content-type": "image/bmp"})  # fmt: skip
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["width"], doc["height"], doc["model"], doc["backend"]) == (513, 513, DM05, "cpu")
    by_label = {c["label"]: c for c in doc["classes"]}
    assert 0.15 < by_label["bird"]["fraction"] < 0.3
    assert sum(c["pixels"] for c in doc["classes"]) == 513 * 513
    assert abs(sum(c["fraction"] for c in doc["classes"]) - 1) < 1e-9
    assert doc["timings_ms"]["invoke"] > 0


@pytest.mark.parametrize(("overlay_format", "magic"), [("jpeg", b"\xff\xd8"), ("png", b"\x89PNG")])
def test_overlay_is_the_image_blended_with_the_mask(
    daemon: Daemon, test_data: Path, overlay_format: str, magic: bytes
) -> None:
    data = (test_data / "cat.bmp").read_bytes()
    with daemon.client() as c:
        r = c.post("/segment", params={"format": "overlay", "overlay_format": overlay_format, "keep_aspect": "true"},
                   files={"image": ("cat.bmp", data, "image/bmp")})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.content.startswith(magic)
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imread(str(test_data / "cat.bmp"))
    assert img.shape == original.shape
    assert 1 < float(np.abs(img.astype(int) - original).mean()) < 80


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"not an image at all", "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
        ({"content": b"plain text", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_image"),
        ({"content": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\x00\x00\x01\x00\x08\x02\x00\x00\x00",
          "headers": {"content-type": "image/png"}}, 400, "bad_image"),
        ({"files": {"other": ("x.png", b"123", "image/png")}}, 422, "bad_parameter"),
        ({"files": [("image", ("a.bmp", b"BM", "image/bmp")), ("image", ("b.bmp", b"BM", "image/bmp"))]}, 422, "bad_parameter"),
        ({"params": {"format": "gif"}, "content": b"x", "headers": {"content-type": "image/png"}}, 422, "bad_parameter"),
        ({"params": {"keep_aspect": "maybe"}, "content": b"x", "headers": {"content-type": "image/png"}}, 422, "bad_parameter"),
        ({"params": {"model": "no_such_model"}, "content": b"x", "headers": {"content-type": "image/png"}}, 404, "unknown_model"),
    ],
)  # fmt: skip
def test_bad_requests_get_the_documented_status_and_a_json_error(
    daemon: Daemon, kwargs: dict[str, object], status: int, code: str
) -> None:
    with daemon.client() as c:
        r = c.post("/segment", **kwargs)  # type: ignore[arg-type]
        assert r.status_code == status, r.text
        assert error_of(r) == code
        assert c.get("/healthz").status_code == 200


def test_truncated_jpeg_is_refused_and_the_server_keeps_serving(daemon: Daemon, test_data: Path) -> None:
    jpeg = cv2.imencode(".jpg", cv2.imread(str(test_data / "bird.bmp")))[1].tobytes()
    with daemon.client() as c:
        r = c.post("/segment", content=jpeg[: len(jpeg) // 2], headers={"content-type": "image/jpeg"})
        assert r.status_code == 400
        assert error_of(r) == "bad_image"
        ok = c.post("/segment", content=jpeg, headers={"content-type": "image/jpeg"})
        assert ok.status_code == 200


def test_image_over_the_pixel_limit_is_refused_before_decoding(daemon: Daemon) -> None:
    big = cv2.imencode(".png", np.zeros((5000, 5000), np.uint8))[1].tobytes()  # 25 MP > 20 MP
    with daemon.client() as c:
        r = c.post("/segment", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413
    assert error_of(r) == "image_too_large"
    assert "25000000" in r.json()["detail"]


def test_unknown_model_route_and_method_errors_are_json(daemon: Daemon) -> None:
    with daemon.client() as c:
        r = c.get("/models/nope")
        assert r.status_code == 404 and error_of(r) == "unknown_model"
        r = c.get("/no/such/path")
        assert r.status_code == 404 and error_of(r) == "not_found"
        r = c.get("/segment")
        assert r.status_code == 405 and error_of(r) == "method_not_allowed"


@pytest.fixture(scope="module")
def small_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path_factory.mktemp("small"), models_dir, "--model", DM05, "--accelerator", "cpu",
        env={"SEGD_MAX_UPLOAD_BYTES": "100000", "SEGD_API_KEY": "s3cret-key"},
    )  # fmt: skip
    yield d
    d.stop()


def test_upload_over_the_byte_limit_is_refused_with_413(small_daemon: Daemon, test_data: Path) -> None:
    data = (test_data / "bird.bmp").read_bytes()  # 526986 bytes > 100000
    auth = {"X-API-Key": "s3cret-key"}
    with small_daemon.client(headers=auth) as c:
        r = c.post("/segment", content=data, headers={"content-type": "image/bmp"})
        assert r.status_code == 413 and error_of(r) == "upload_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            for i in range(0, len(data), 16384):
                yield data[i : i + 16384]

        r = c.post("/segment", content=chunks(), headers={"content-type": "image/bmp"})
        assert r.status_code == 413 and error_of(r) == "upload_too_large"
    with small_daemon.client(headers=auth) as c:
        small = cv2.imencode(".jpg", cv2.imread(str(test_data / "bird.bmp")))[1].tobytes()
        assert c.post("/segment", content=small, headers={"content-type": "image/jpeg"}).status_code == 200


# --- API key -------------------------------------------------------------------------------
def test_api_key_is_enforced_on_every_route_but_health(small_daemon: Daemon, test_data: Path) -> None:
    jpeg = cv2.imencode(".jpg", cv2.imread(str(test_data / "bird.bmp")))[1].tobytes()
    body = {"content": jpeg, "headers": {"content-type": "image/jpeg"}}
    with small_daemon.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        for method, path in (("GET", "/models"), ("GET", f"/models/{DM05}"), ("GET", "/metrics")):
            r = c.request(method, path)
            assert r.status_code == 401 and error_of(r) == "unauthorized", path
        r = c.post("/segment", **body)  # type: ignore[arg-type]
        assert r.status_code == 401 and "s3cret" not in r.text
        r = c.post("/segment", content=jpeg, headers={"content-type": "image/jpeg", "X-API-Key": "wrong"})
        assert r.status_code == 401
        r = c.post("/segment", content=jpeg, headers={"content-type": "image/jpeg", "X-API-Key": "s3cret-key"})
        assert r.status_code == 200
        r = c.post("/segment", content=jpeg, headers={"content-type": "image/jpeg", "Authorization": "Bearer s3cret-key"})
        assert r.status_code == 200
        assert c.get("/metrics", headers={"X-API-Key": "s3cret-key"}).status_code == 200
    assert "s3cret-key" not in small_daemon.output()


def test_without_a_key_every_route_is_open(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.get("/models").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_refuses_a_non_loopback_bind_without_a_key(tmp_path: Path, models_dir: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "segd", "serve", "--host", "0.0.0.0", "--models-dir", str(models_dir)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in r.stderr


# --- models, metrics -----------------------------------------------------------------------
def test_models_report_backend_reason_sizes_labels_and_stats(daemon: Daemon, test_data: Path) -> None:
    with daemon.client() as c:
        c.post("/segment", params={"model": DM05}, content=(test_data / "bird.bmp").read_bytes(),
               headers={"content-type": "image/bmp"})  # fmt: skip
        doc = c.get("/models").json()
        one = c.get(f"/models/{DM05}").json()
        ready = c.get("/readyz").json()
    assert doc["default"] == DM1
    assert one["device_present"] is None and ready["models"][DM05]["device_present"] is None  # no device on the CPU
    assert {m["name"] for m in doc["models"]} == {DM1, DM05}
    assert one["backend"] == "cpu" and one["reason"] == "CPU requested"
    assert one["input_size"] == [513, 513]
    assert one["output"]["kind"] == "logits" and one["output"]["shape"] == [1, 33, 33, 21]
    assert one["labels"][3] == "bird"
    assert len(one["sha256"]) == 64
    assert one["load_seconds"] > 0
    assert one["requests"] >= 1 and one["latency_ms"]["p50"] > 0


def test_metrics_are_prometheus_text_with_requests_stages_queue_and_backend(daemon: Daemon, test_data: Path) -> None:
    with daemon.client() as c:
        c.post("/segment", content=(test_data / "bird.bmp").read_bytes(), headers={"content-type": "image/bmp"})
        c.post("/segment", content=b"junk", headers={"content-type": "image/png"})
        text = c.get("/metrics").text
    assert f'segd_requests_total{{model="{DM1}",route="/segment",status="200"}}' in text
    assert f'segd_requests_total{{model="{DM1}",route="/segment",status="415"}}' in text
    assert f'segd_stage_seconds_count{{model="{DM1}",stage="invoke"}}' in text
    assert f'segd_queue_depth{{model="{DM1}"}} 0.0' in text
    assert f'segd_model_backend{{backend="cpu",model="{DM1}"}} 1.0' in text
    assert f'segd_tpu_worker_restarts_total{{model="{DM1}"}} 0.0' in text


def test_openapi_documents_the_segment_endpoint(daemon: Daemon) -> None:
    with daemon.client() as c:
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
    op = spec["paths"]["/segment"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(op["requestBody"]["content"])
    assert {"200", "413", "415", "422", "503"} <= set(op["responses"])


# --- concurrency ---------------------------------------------------------------------------
def test_16_clients_x_200_requests_all_correct_no_5xx(
    daemon: Daemon, engines: dict[str, Segmenter], test_data: Path
) -> None:
    images = []
    for name in ("bird.bmp", "cat.bmp"):
        rgb = cv2.cvtColor(cv2.imread(str(test_data / name)), cv2.COLOR_BGR2RGB)
        for size in ((257, 193), (160, 120)):
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            data = png_bytes(small)
            images.append((DM05, data, engines[DM05].segment(data).mask))
    images.append((DM1, images[0][1], engines[DM1].segment(images[0][1]).mask))
    statuses: list[int] = []
    wrong: list[str] = []

    def client(k: int) -> None:
        with daemon.client() as c:
            for i in range(200):
                model, data, expected = images[(k + i) % len(images)]
                r = c.post("/segment", params={"model": model}, content=data, headers={"content-type": "image/png"})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    got = read_mask_png(r.content)
                    if not np.array_equal(got, expected):
                        wrong.append(f"client {k} request {i} {model}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(client, range(16)))
    assert len(statuses) == 3200
    assert statuses.count(200) == 3200, {s: statuses.count(s) for s in set(statuses)}
    assert wrong == []
    with daemon.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/segment", content=images[0][1], headers={"content-type": "image/png"}).status_code == 200


def test_full_queue_answers_503_with_retry_after(tmp_path: Path, models_dir: Path, test_data: Path) -> None:
    d = start_daemon(tmp_path, models_dir, "--model", DM1, "--accelerator", "cpu", "--threads", "1",
                     env={"SEGD_QUEUE_SIZE": "1"})  # fmt: skip
    try:
        big = png_bytes(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: httpx.post(d.url + "/segment", content=big, timeout=60,
                                                    headers={"content-type": "image/png"}), range(8)))  # fmt: skip
        codes = [r.status_code for r in rs]
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert error_of(busy) == "overloaded" and busy.headers["retry-after"] == "1"
        assert httpx.post(d.url + "/segment", content=big, headers={"content-type": "image/png"}, timeout=60).status_code == 200
    finally:
        d.stop()


# --- readiness and shutdown ----------------------------------------------------------------
def test_readyz_is_503_until_models_are_loaded_and_warmed_up(
    tmp_path: Path, gated_mirror: tuple[str, threading.Event]
) -> None:
    url, gate = gated_mirror
    empty = tmp_path / "models"
    empty.mkdir()
    d = start_daemon(tmp_path, empty, "--model", DM05, "--accelerator", "cpu",
                     "--mirror", url, wait="healthy")  # fmt: skip
    try:
        r = httpx.get(d.url + "/readyz")
        assert r.status_code == 503 and r.json()["models"][DM05]["state"] == "loading"
        r = httpx.post(d.url + "/segment", content=b"x", headers={"content-type": "image/png"})
        assert r.status_code == 503 and error_of(r) == "model_not_ready"
        gate.set()
        d.wait_ready()
        assert (empty / "deeplabv3_mnv2_dm05_pascal_quant.tflite").is_file()
        assert httpx.get(d.url + f"/models/{DM05}").json()["selftest"]["passed"] is True
    finally:
        d.stop()


def test_sigterm_drains_requests_in_flight_then_exits(tmp_path: Path, models_dir: Path, test_data: Path) -> None:
    d = start_daemon(tmp_path, models_dir, "--model", DM1, "--accelerator", "cpu", "--threads", "1",
                     env={"SEGD_QUEUE_SIZE": "16"})  # fmt: skip
    data = png_bytes(cv2.resize(cv2.imread(str(test_data / "bird.bmp")), (1600, 1072)))
    started = threading.Barrier(9)

    def one(_: int) -> int:
        with httpx.Client(timeout=60) as c:
            started.wait()
            return c.post(d.url + "/segment", content=data, headers={"content-type": "image/png"}).status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        started.wait()
        time.sleep(0.15)  # requests are in flight (8 x ~50+ ms of serialized inference)
        d.proc.send_signal(signal.SIGTERM)
        codes = [f.result() for f in futures]
    assert d.proc.wait(30) == 0
    assert codes == [200] * 8, codes
    with pytest.raises(httpx.ConnectError):
        httpx.get(d.url + "/healthz", timeout=2)
    assert "Traceback" not in d.output()


def test_healthz_answers_while_the_model_is_busy(daemon: Daemon, test_data: Path) -> None:
    """The event loop is never blocked by inference or decoding."""
    data = png_bytes(cv2.resize(cv2.imread(str(test_data / "bird.bmp")), (3000, 2000)))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, daemon.url + "/segment", content=data,
                               headers={"content-type": "image/png"}, timeout=60) for _ in range(4)]  # fmt: skip
        time.sleep(0.05)
        t = time.perf_counter()
        assert httpx.get(daemon.url + "/healthz", timeout=5).status_code == 200
        health_ms = (time.perf_counter() - t) * 1000
        assert all(f.result().status_code == 200 for f in futures)
    assert health_ms < 1000, health_ms




def test_access_log_writes_one_line_per_request_and_can_be_turned_off(tmp_path: Path, models_dir: Path) -> None:
    for setting, expected in (("true", 3), ("false", 0)):
        d = start_daemon(tmp_path, models_dir, "--model", DM05, "--accelerator", "cpu",
                         env={"SEGD_LOG_LEVEL": "info", "SEGD_ACCESS_LOG": setting})  # fmt: skip
        try:
            with d.client() as c:
                for path in ("/openapi.json", "/models?x=1", "/nope"):
                    c.get(path)
        finally:
            d.stop()
        lines = [line for line in d.output().splitlines()
                 if "segd.access" in line and ("/openapi.json" in line or "x=1" in line or "/nope" in line)]  # fmt: skip
        assert len(lines) == expected, d.output()
        if expected:
            assert '127.0.0.1 "GET /openapi.json" 200' in lines[0]
            assert '"GET /models?x=1" 200' in lines[1] and "model=" not in lines[1]
            assert '"GET /nope" 404' in lines[2]
