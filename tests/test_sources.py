"""Cameras configured in the settings file, against real streams on 127.0.0.1: an HTTP MJPEG
camera served by the test, and the ffmpeg-subprocess reader on a stream served by ffmpeg.
Frames go through the real daemon and the real models; outputs are read the way their users
read them (OpenCV for the MJPEG stream, a WebSocket client for the events)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from camera import Camera
from conftest import read_mask_png
from daemon import Daemon, start_daemon

from segd import encode
from segd.labels import voc_palette
from segd.settings import load_settings

DM05 = "deeplabv3_mnv2_dm05_pascal"


def jpeg(path: Path, quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if size is not None:
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def write_config(tmp_path: Path, sources: dict[str, dict[str, Any]], extra: str = "") -> Path:
    lines = [extra]
    for name, table in sources.items():
        lines.append(f"[sources.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path = tmp_path / "segd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def source(d: Daemon, name: str) -> dict[str, Any]:
    r = httpx.get(f"{d.url}/sources/{name}", timeout=10)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def frames(test_data: Path) -> list[bytes]:
    return [jpeg(test_data / "bird.bmp"), jpeg(test_data / "cat.bmp")]


@pytest.fixture(scope="module")
def camera(frames: list[bytes]) -> Iterator[Camera]:
    cam = Camera(frames, fps=8)
    yield cam
    cam.stop()


@pytest.fixture(scope="module")
def still_camera(test_data: Path) -> Iterator[Camera]:
    """Sends one image over and over: every overlay of its stream must be the same picture."""
    cam = Camera([jpeg(test_data / "bird.bmp")], fps=8)
    yield cam
    cam.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, camera: Camera, still_camera: Camera) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("sources")
    config = write_config(tmp, {
        "door": {"url": camera.url + "/stream", "fps": 4, "model": DM05, "reconnect_base": 0.2, "reconnect_max": 0.5, "timeout": 3},
        "still": {"url": still_camera.url + "/stream", "fps": 4, "model": DM05},
        "porch": {"url": camera.url + "/snapshot.jpg", "kind": "snapshot", "fps": 2, "model": DM05},
    })  # fmt: skip
    d = start_daemon(tmp, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu")
    yield d
    d.stop()


# --- frames are segmented like POST /segment ------------------------------------------------
@pytest.mark.parametrize("name", ["door", "porch"])
def test_camera_frames_are_segmented_with_the_masks_of_post_segment(daemon: Daemon, name: str) -> None:
    wait_for(lambda: source(daemon, name)["frames"]["segmented"] >= 2, what=f"{name} frames")
    with daemon.client() as c:
        for _ in range(20):  # the three reads must see the same frame (a new one may land between)
            frame = c.get(f"/sources/{name}/latest", params={"format": "frame"})
            png = c.get(f"/sources/{name}/latest", params={"format": "png"})
            doc = c.get(f"/sources/{name}/latest", params={"format": "json"})
            seqs = {r.headers["x-segd-frame"] for r in (frame, png, doc)}
            if len(seqs) == 1:
                break
        assert len(seqs) == 1, seqs
        assert frame.headers["content-type"] == "image/jpeg"
        posted = c.post("/segment", params={"model": DM05}, content=frame.content, headers={"content-type": "image/jpeg"})
        assert posted.status_code == 200, posted.text
    mask = read_mask_png(png.content)
    assert np.array_equal(mask, read_mask_png(posted.content))
    summary = json.loads(posted.headers["x-segd-summary"])
    body = doc.json()
    assert body["classes"] == summary["classes"]
    h, w = cv2.imdecode(np.frombuffer(frame.content, np.uint8), cv2.IMREAD_COLOR).shape[:2]
    assert (body["source"], body["model"], body["width"], body["height"]) == (name, DM05, w, h)
    assert {c["label"] for c in body["classes"]} & {"bird", "cat"}


def test_sources_report_state_counters_in_sources_readyz_and_metrics(daemon: Daemon) -> None:
    wait_for(lambda: source(daemon, "door")["frames"]["segmented"] >= 1, what="door frames")
    with daemon.client() as c:
        listed = {s["name"]: s for s in c.get("/sources").json()["sources"]}
        ready = c.get("/readyz").json()
        metrics = c.get("/metrics").text
    assert set(listed) == {"door", "still", "porch"}
    door = listed["door"]
    assert (door["kind"], door["state"], door["model"]) == ("mjpeg", "streaming", DM05)
    assert listed["porch"]["kind"] == "snapshot"
    assert door["frames"]["received"] >= door["frames"]["segmented"] >= 1
    assert ready["sources"]["door"]["state"] == "streaming"
    assert ready["ready"] is True
    assert 'segd_source_up{source="door"} 1.0' in metrics
    assert 'segd_source_frames_total{outcome="segmented",source="door"}' in metrics


def test_unknown_source_is_404_and_no_request_names_a_url(daemon: Daemon) -> None:
    with daemon.client() as c:
        r = c.get("/sources/nope/latest")
        assert r.status_code == 404 and r.json()["error"] == "unknown_source"
        schema = c.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        if path.startswith("/sources"):
            for op in ops.values():
                names = {p["name"] for p in op.get("parameters", [])}
                assert names <= {"name", "format"}, (path, names)


# --- outputs --------------------------------------------------------------------------------
def test_mjpeg_stream_read_by_opencv_shows_the_overlay_of_each_frame(daemon: Daemon, still_camera: Camera) -> None:
    wait_for(lambda: source(daemon, "still")["frames"]["segmented"] >= 1, what="still frames")
    with daemon.client() as c:
        raw = c.get("/sources/still/latest", params={"format": "frame"}).content
        mask = read_mask_png(c.get("/sources/still/latest", params={"format": "png"}).content)
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    expected = encode.overlay(rgb, mask, voc_palette())
    tinted = mask != 0
    assert 0.02 < tinted.mean() < 0.98
    cap = cv2.VideoCapture(f"{daemon.url}/sources/still/stream", cv2.CAP_FFMPEG)
    try:
        assert cap.isOpened()
        for _ in range(3):
            ok, bgr = cap.read()
            assert ok
            got = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            assert got.shape == expected.shape
            diff = np.abs(got.astype(np.int16) - expected.astype(np.int16)).mean(axis=2)
            assert diff.mean() < 4.0  # JPEG (quality 90)
            # tinted where the mask has a class, the photo itself elsewhere
            away = np.abs(got.astype(np.int16) - rgb.astype(np.int16)).mean(axis=2)
            assert away[tinted].mean() > 4 * away[~tinted].mean()
    finally:
        cap.release()


def test_websocket_sends_a_json_summary_per_frame(daemon: Daemon) -> None:
    from websockets.sync.client import connect

    ws_url = daemon.url.replace("http://", "ws://") + "/sources/door/events"
    with connect(ws_url, open_timeout=10) as ws:
        docs = [json.loads(ws.recv(timeout=15)) for _ in range(3)]
    seqs = [d["frame"] for d in docs]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    for d in docs:
        assert d["source"] == "door" and d["model"] == DM05
        assert d["classes"] and abs(sum(c["fraction"] for c in d["classes"]) - 1) < 1e-9


# --- failures -------------------------------------------------------------------------------
def test_camera_that_goes_away_is_reconnected_when_it_comes_back(daemon: Daemon, camera: Camera) -> None:
    wait_for(lambda: source(daemon, "door")["state"] == "streaming", what="streaming")
    camera.stop()
    down = wait_for(lambda: (s := source(daemon, "door"))["state"] == "reconnecting" and s, what="reconnecting")
    assert down["error"]
    time.sleep(1.0)  # a few failed attempts against a closed port
    before = source(daemon, "door")
    camera.start()
    wait_for(lambda: source(daemon, "door")["frames"]["segmented"] > before["frames"]["segmented"] + 1,
             what="frames after the camera came back")  # fmt: skip
    after = source(daemon, "door")
    assert after["state"] == "streaming" and after["error"] is None
    assert after["reconnects"] >= 2


def test_settings_file_sources_are_validated(tmp_path: Path) -> None:
    good = write_config(tmp_path, {"gate": {"url": "rtsp://user:pw@10.0.0.2/stream1", "fps": 2, "thresholds": {"person": 5}}})
    s = load_settings(good, env={})
    assert s.sources["gate"].kind == "rtsp" and s.sources["gate"].thresholds == {"person": 5.0}
    for table, message in (
        ({"url": "file:///etc/passwd"}, "needs a http or https URL"),
        ({"url": "http://x/", "kind": "ftp"}, "kind must be one of"),
        ({"url": "http://x/", "fps": 0}, "fps must be within"),
        ({"url": "http://x/", "colour": 1}, "unknown setting 'colour'"),
        ({"fps": 1}, "needs a url"),
    ):
        with pytest.raises(ValueError, match=message):
            load_settings(write_config(tmp_path, {"gate": table}), env={})


def test_camera_faster_than_segmentation_drops_frames_in_bounded_memory(
    tmp_path: Path, models_dir: Path, test_data: Path
) -> None:
    """A 1080p camera sending as fast as the socket goes while segmentation runs at 2 fps:
    the frames not segmented are dropped (counted), the daemon's memory stays flat."""
    big = [jpeg(test_data / "bird.bmp", 95, (1920, 1080)), jpeg(test_data / "cat.bmp", 95, (1920, 1080))]
    cam = Camera(big, fps=None)
    config = write_config(tmp_path, {"fast": {"url": cam.url + "/stream", "fps": 2, "model": DM05}})
    d = start_daemon(tmp_path, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu")
    try:
        wait_for(lambda: source(d, "fast")["frames"]["segmented"] >= 2, what="first frames")
        start_rss, start = rss_bytes(d.proc.pid), source(d, "fast")["frames"]
        time.sleep(6)
        end_rss, end = rss_bytes(d.proc.pid), source(d, "fast")["frames"]
    finally:
        d.stop()
        cam.stop()
    received = end["received"] - start["received"]
    segmented = end["segmented"] - start["segmented"]
    bytes_in = received * min(len(b) for b in big)
    assert received > 10 * segmented > 0, (received, segmented)
    # every frame not segmented was dropped, but the one waiting and the one being segmented
    assert end["dropped"] >= end["received"] - end["segmented"] - 2
    assert bytes_in > 200 * 2**20, bytes_in  # a queue of them would have grown by this much
    assert end_rss - start_rss < 40 * 2**20, (start_rss, end_rss)
    print(f"fast camera: {received} frames ({bytes_in / 2**20:.0f} MiB) in 6 s, {segmented} segmented, "
          f"RSS {start_rss / 2**20:.1f} -> {end_rss / 2**20:.1f} MiB")


# --- RTSP: ffmpeg reads a real RTSP server --------------------------------------------------
RTSP_SERVER = Path(__file__).resolve().parent / "rtsp_server.py"


class RtspServer:
    """tests/rtsp_server.py (GStreamer's RTSP server) in a child process; stop() and start()
    again on the same port, like a camera that reboots."""

    def __init__(self, video: Path) -> None:
        self.video = video
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> None:
        self.proc = subprocess.Popen(["/usr/bin/python3", str(RTSP_SERVER), str(self.video), str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"RTSP server did not start: {line}{self.proc.stderr.read() if self.proc.stderr else ''}")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def rtsp_camera(tmp_path_factory: pytest.TempPathFactory, test_data: Path) -> Iterator[RtspServer]:
    if not Path("/usr/bin/python3").is_file() or subprocess.run(
        ["/usr/bin/python3", "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"], capture_output=True
    ).returncode != 0:  # fmt: skip
        pytest.fail("GStreamer's RTSP server is not installed (scripts/setup test: gir1.2-gst-rtsp-server-1.0 python3-gi)")
    tmp = tmp_path_factory.mktemp("rtsp")
    for i, name in enumerate(("bird.bmp", "cat.bmp")):
        cv2.imwrite(str(tmp / f"f{i}.png"), cv2.resize(cv2.imread(str(test_data / name)), (512, 336)))  # RTP/JPEG sizes are multiples of 8
    video = tmp / "camera.avi"
    # RTP/JPEG (RFC 2435) carries baseline JPEG with the standard Huffman tables
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-loop", "1", "-framerate", "4",
                    "-i", str(tmp / "f%d.png"), "-t", "120", "-c:v", "mjpeg", "-huffman", "default", "-q:v", "3",
                    "-pix_fmt", "yuvj420p", str(video)], check=True)  # fmt: skip
    server = RtspServer(video)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rtsp_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, rtsp_camera: RtspServer) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("rtsp-daemon")
    config = write_config(tmp, {"gate": {"url": rtsp_camera.url, "fps": 3, "model": DM05, "reconnect_base": 0.2,
                                         "reconnect_max": 0.5, "timeout": 3}})  # fmt: skip
    d = start_daemon(tmp, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu")
    yield d
    d.stop()


def test_rtsp_camera_frames_are_segmented_with_the_masks_of_post_segment(rtsp_daemon: Daemon) -> None:
    wait_for(lambda: source(rtsp_daemon, "gate")["frames"]["segmented"] >= 2, what="RTSP frames")
    assert source(rtsp_daemon, "gate")["kind"] == "rtsp"
    with rtsp_daemon.client() as c:
        for _ in range(20):
            frame = c.get("/sources/gate/latest", params={"format": "frame"})
            png = c.get("/sources/gate/latest", params={"format": "png"})
            if frame.headers["x-segd-frame"] == png.headers["x-segd-frame"]:
                break
        posted = c.post("/segment", params={"model": DM05}, content=frame.content, headers={"content-type": "image/jpeg"})
    assert frame.headers["x-segd-frame"] == png.headers["x-segd-frame"]
    assert posted.status_code == 200, posted.text
    mask = read_mask_png(png.content)
    assert mask.shape == (336, 512)
    assert np.array_equal(mask, read_mask_png(posted.content))
    labels = {c["label"] for c in json.loads(posted.headers["x-segd-summary"])["classes"]}
    assert labels & {"bird", "cat"}


def test_rtsp_camera_is_reconnected_after_a_restart(rtsp_daemon: Daemon, rtsp_camera: RtspServer) -> None:
    wait_for(lambda: source(rtsp_daemon, "gate")["state"] == "streaming", what="streaming")
    rtsp_camera.stop()
    down = wait_for(lambda: (s := source(rtsp_daemon, "gate"))["state"] == "reconnecting" and s, what="reconnecting")
    wait_for(lambda: "Connection refused" in str(source(rtsp_daemon, "gate")["error"]), timeout=15,
             what="ffmpeg's own message as the error")  # fmt: skip
    assert str(down["error"]).startswith("ffmpeg ended")
    time.sleep(1.0)
    before = source(rtsp_daemon, "gate")["frames"]["segmented"]
    rtsp_camera.start()
    wait_for(lambda: source(rtsp_daemon, "gate")["frames"]["segmented"] > before + 1, what="frames after restart")
    after = source(rtsp_daemon, "gate")
    assert after["state"] == "streaming" and after["reconnects"] >= 1


# --- API key, shutdown ----------------------------------------------------------------------
def test_api_key_guards_cameras_basic_auth_for_mjpeg_and_first_message_for_websocket(
    tmp_path: Path, models_dir: Path, still_camera: Camera
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    key = "camera-test-key"
    config = write_config(tmp_path, {"cam": {"url": still_camera.url + "/stream", "fps": 4, "model": DM05}})
    d = start_daemon(tmp_path, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu",
                     env={"SEGD_API_KEY": key})  # fmt: skip
    try:
        assert httpx.get(d.url + "/sources").status_code == 401
        assert httpx.get(d.url + "/sources/cam/stream", auth=("ha", "wrong")).status_code == 401
        wait_for(lambda: httpx.get(d.url + "/sources/cam", headers={"X-API-Key": key}).json()["frames"]["segmented"] >= 1)
        # Home Assistant's MJPEG camera: HTTP Basic, the key as the password
        with httpx.stream("GET", d.url + "/sources/cam/stream", auth=("ha", key), timeout=20) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "multipart/x-mixed-replace; boundary=segdframe"
            head = next(r.iter_bytes())
            assert head.startswith(b"--segdframe\r\nContent-Type: image/jpeg\r\n")
            # SIGTERM while the endless response is open: it ends, the daemon exits promptly
            t0 = time.monotonic()
            assert d.stop() == 0
            assert time.monotonic() - t0 < 15
    finally:
        d.stop()
    d = start_daemon(tmp_path, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu",
                     env={"SEGD_API_KEY": key})  # fmt: skip
    try:
        ws_url = d.url.replace("http://", "ws://") + "/sources/cam/events"
        with connect(ws_url, open_timeout=10) as ws:
            ws.send("wrong")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        with connect(ws_url, open_timeout=10) as ws:  # a browser cannot set headers: key first
            ws.send(key)
            assert json.loads(ws.recv(timeout=15))["source"] == "cam"
        with connect(ws_url, open_timeout=10, additional_headers={"X-API-Key": key}) as ws:
            assert json.loads(ws.recv(timeout=15))["source"] == "cam"
    finally:
        d.stop()


def test_a_threshold_on_a_class_the_model_lacks_stops_the_start_with_its_name(tmp_path: Path, models_dir: Path) -> None:
    import os
    import sys

    config = write_config(tmp_path, {"cam": {"url": "http://127.0.0.1:9/stream", "model": DM05, "thresholds": {"unicorn": 5}}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGD_")}
    env.update(SEGD_MODELS_DIR=str(models_dir), SEGD_EDGETPU_LIBRARY="/nonexistent/libedgetpu.so.1")
    r = subprocess.run([sys.executable, "-m", "segd", "serve", "--config", str(config), "--model", DM05, "--port", "0"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "sources.cam.thresholds: unicorn not among the classes" in r.stderr and "Traceback" not in r.stderr


def test_a_camera_that_stops_sending_is_reconnected(tmp_path: Path, models_dir: Path, test_data: Path) -> None:
    """The connection stays open but no frame comes (a hung camera): after timeout + 1/fps
    seconds the connection is dropped and made again."""
    cam = Camera([jpeg(test_data / "bird.bmp")], fps=8)
    config = write_config(tmp_path, {"hung": {"url": cam.url + "/stream", "fps": 4, "model": DM05, "timeout": 1,
                                              "reconnect_base": 0.2, "reconnect_max": 0.5}})  # fmt: skip
    d = start_daemon(tmp_path, models_dir, "--config", str(config), "--model", DM05, "--accelerator", "cpu")
    try:
        wait_for(lambda: source(d, "hung")["frames"]["segmented"] >= 1, what="first frame")
        cam.frozen = True
        hung = wait_for(lambda: (s := source(d, "hung"))["reconnects"] >= 1 and s, timeout=15, what="a reconnect")
        # dropped by the watchdog ("no frame for 1.25 s"), then the new connection's read times out
        assert hung["state"] == "reconnecting" and ("no frame for 1.25 s" in hung["error"] or "timed out" in hung["error"])
        before = source(d, "hung")["frames"]["segmented"]
        cam.frozen = False
        wait_for(lambda: source(d, "hung")["frames"]["segmented"] > before, what="frames again")
    finally:
        d.stop()
        cam.stop()
