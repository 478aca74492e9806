"""Hostile inputs over real HTTP, as a table: each gets its documented status and a JSON error
``{"error", "detail"}``, a good image is still served right after it, and the daemon never logs
a traceback. Then the attacks below the application, on raw sockets: slow clients (idle,
trickled headers, trickled body, a reader that stops reading), many idle connections, clients
that vanish mid-upload, oversized and malformed HTTP.

The daemon runs with short client deadlines (``SEGD_HEADER_TIMEOUT=2``,
``SEGD_BODY_TIMEOUT=3``) so the slow-client cases finish in seconds; the defaults are 10 s / 60 s.
The minimum upload rate is off here so the body deadline is what a trickled body meets;
floods, slow uploads and the rate itself are in ``test_connections.py``.
Decoder-level coverage of the same inputs (memory, exact pixels) is in ``test_preprocess.py``;
this file checks what a client sees.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from conftest import read_mask_png
from conftest import test_data_dir as data_dir
from daemon import Daemon, start_daemon
from test_preprocess import (
    _bomb_headers,
    blocks,
    cv_encode,
    exif_block,
    jpeg_with_exif,
    make_png,
    make_tiff,
)

from segd.engine import Segmenter

DM05 = "deeplabv3_mnv2_dm05_pascal"
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path_factory.mktemp("hostile"), models_dir, "--model", DM05, "--accelerator", "cpu",
        env={"SEGD_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "SEGD_BODY_TIMEOUT": str(BODY_TIMEOUT),
             "SEGD_MAX_PIXELS": "20000000", "SEGD_MIN_UPLOAD_RATE": "0"},
    )  # fmt: skip
    yield d
    d.stop()


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One request and what the daemon must answer. ``content_type=None`` sends no header;
    ``files`` makes it a multipart request; ``mask_hw`` is the mask size expected with 200."""

    body: bytes = b""
    content_type: str | None = "application/octet-stream"
    files: list[tuple[str, Any]] | None = None
    data: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    status: int = 200
    error: str | None = None
    mask_hw: tuple[int, int] | None = None


def _photo(h: int, w: int) -> np.ndarray:
    """Coral's bird photo at h x w (real content, so masks are not trivially all background)."""
    bgr = cv2.imread(str(data_dir() / "bird.bmp"))
    return cv2.cvtColor(cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def _pil(img: np.ndarray, fmt: str, mode: str | None = None, **kw: Any) -> bytes:
    from PIL import Image

    im = Image.fromarray(img)
    if mode == "P":
        im = im.quantize(64)
    elif mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _animation(ext: str, frames: list[np.ndarray]) -> bytes:
    anim = cv2.Animation()
    anim.frames = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]
    anim.durations = [100] * len(frames)
    ok, buf = cv2.imencodeanimation(ext, anim)
    assert ok
    return bytes(buf.tobytes())


def build_cases() -> dict[str, Case]:
    h, w = 43, 64
    rgb = _photo(h, w)
    jpeg = cv_encode(rgb, ".jpg")
    png = cv_encode(rgb, ".png")
    img16 = (rgb.astype(np.uint16) * 257 + np.arange(w, dtype=np.uint16)[None, :, None]).astype(np.uint16)
    idx = (rgb[:, :, 0] // 64).astype(np.uint8)
    pal = bytes([0, 0, 0, 200, 30, 30, 30, 200, 30, 240, 240, 240])
    frames = [rgb, rgb[::-1].copy(), 255 - rgb]
    ok = {"mask_hw": (h, w)}
    cases: dict[str, Case] = {}

    # decompression bombs: tiny files declaring 100000 x 100000 (or the format's maximum)
    for name, data in _bomb_headers(100_000).items():
        cases[f"bomb-{name}"] = Case(data, status=413, error="image_too_large")
    cases["bomb-tiff-tile"] = Case(make_tiff(blocks(4, 4), tile=(40000, 40000)), status=413, error="image_too_large")
    cases["png-side-over-libpng-limit"] = Case(make_png(np.zeros((1, 1_000_001), np.uint8), 0, 8), status=413,
                                               error="image_too_large")  # fmt: skip
    cases["bomb-in-multipart"] = Case(files=[("image", ("b.png", _bomb_headers(100_000)["png"], "image/png"))],
                                      status=413, error="image_too_large")  # fmt: skip
    # truncated and empty
    for ext in (".jpg", ".png", ".bmp", ".gif", ".webp", ".tiff"):
        data = cv_encode(rgb, ext)
        cases[f"truncated-half{ext}"] = Case(data[: len(data) // 2], status=400, error="bad_image")
        cases[f"truncated-last-byte{ext}"] = Case(data[:-1], status=400, error="bad_image")
    cases["jpeg-header-only"] = Case(jpeg[:20], status=400, error="bad_image")
    cases["empty-raw-body"] = Case(b"", status=400, error="empty_image")
    cases["empty-multipart-file"] = Case(files=[("image", ("e.png", b"", "image/png"))], status=400, error="empty_image")
    cases["png-declaring-zero-width"] = Case(make_png(np.zeros((5, 1), np.uint8), 0, 8, size=(0, 5)), status=400,
                                             error="empty_image")  # fmt: skip
    # tiny and thin
    one = _photo(1, 1)
    cases["1x1-png"] = Case(cv_encode(one, ".png"), mask_hw=(1, 1))
    cases["1x1-jpeg"] = Case(cv_encode(one, ".jpg"), mask_hw=(1, 1))
    cases["1x1-gif"] = Case(cv_encode(one, ".gif"), mask_hw=(1, 1))
    cases["1x700-png"] = Case(cv_encode(_photo(1, 700), ".png"), mask_hw=(1, 700))
    cases["700x1-png"] = Case(cv_encode(_photo(700, 1), ".png"), mask_hw=(700, 1))
    cases["1x700-png-keep-aspect"] = Case(cv_encode(_photo(1, 700), ".png"), params={"keep_aspect": "true"},
                                          mask_hw=(1, 700))  # fmt: skip
    cases["1x2000-jpeg-json"] = Case(cv_encode(_photo(1, 2000), ".jpg"), params={"format": "json"})
    # unusual sample layouts
    cases["16-bit-rgb-png"] = Case(make_png(img16, 2, 16), **ok)
    cases["16-bit-gray-png"] = Case(make_png(img16[:, :, 0], 0, 16), **ok)
    cases["16-bit-tiff"] = Case(make_tiff(img16), **ok)
    cases["palette-png"] = Case(_pil(rgb, "PNG", "P"), **ok)
    cases["palette-png-with-transparency"] = Case(make_png(idx, 3, 8, plte=pal, trns=b"\x00\x80"), **ok)
    cases["rgba-png"] = Case(_pil(np.dstack([rgb, np.full((h, w), 100, np.uint8)]), "PNG"), **ok)
    cases["cmyk-jpeg"] = Case(_pil(rgb, "JPEG", "CMYK", quality=95), **ok)
    cases["grayscale-jpeg"] = Case(_pil(rgb, "JPEG", "L"), **ok)
    cases["progressive-jpeg"] = Case(cv_encode(rgb, ".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)), **ok)
    cases["32-bit-bmp-with-alpha"] = Case(cv_encode(np.dstack([rgb, np.full((h, w), 255, np.uint8)]), ".bmp"), **ok)
    cases["animated-gif"] = Case(_animation(".gif", frames), **ok)
    cases["animated-webp"] = Case(_animation(".webp", frames), **ok)
    cases["animated-png"] = Case(_animation(".png", frames), **ok)
    # EXIF orientation: bogus values are ignored, real ones rotate the mask with the image
    for bogus in (0, 9, 65535):
        cases[f"exif-orientation-{bogus}"] = Case(jpeg_with_exif(jpeg, bogus), **ok)
    cases["exif-orientation-6-jpeg"] = Case(jpeg_with_exif(jpeg, 6), mask_hw=(w, h))
    cases["exif-orientation-8-png"] = Case(make_png(rgb, 2, 8, extra=((b"eXIf", exif_block(8)),)), mask_hw=(w, h))
    junk = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"  # IFD offset far outside the segment
    cases["exif-malformed"] = Case(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + jpeg[2:], **ok)
    # content types: the declared image type is not trusted (the bytes decide), non-image
    # types are refused before the body is decoded
    cases["png-as-text/plain"] = Case(png, "text/plain", status=415, error="unsupported_media_type")
    cases["png-as-application/json"] = Case(png, "application/json", status=415, error="unsupported_media_type")
    cases["png-without-content-type"] = Case(png, None, status=415, error="unsupported_media_type")
    cases["png-as-x-www-form-urlencoded"] = Case(png, "application/x-www-form-urlencoded", status=415,
                                                 error="unsupported_media_type")  # fmt: skip
    cases["jpeg-labelled-image/png"] = Case(jpeg, "image/png", **ok)
    cases["text-labelled-image/jpeg"] = Case(b"hello, not an image", "image/jpeg", status=415,
                                             error="unsupported_media_type")  # fmt: skip
    cases["pdf-labelled-image/png"] = Case(b"%PDF-1.7\n" + b"x" * 100, "image/png", status=415,
                                           error="unsupported_media_type")  # fmt: skip
    cases["svg-labelled-image/svg+xml"] = Case(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml",
                                               status=415, error="unsupported_media_type")  # fmt: skip
    cases["heic-like"] = Case(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "image/heic", status=415,
                              error="unsupported_media_type")  # fmt: skip
    cases["bigtiff"] = Case(b"II+\x00\x08\x00\x00\x00" + b"\x00" * 64, "image/tiff", status=415,
                            error="unsupported_media_type")  # fmt: skip
    cases["gzip-of-zeros-labelled-image"] = Case(gzip.compress(b"\x00" * 10_000_000), "image/png", status=415,
                                                 error="unsupported_media_type")  # fmt: skip
    # multipart
    cases["multipart-one-file"] = Case(files=[("image", ("a.jpg", jpeg, "image/jpeg"))], **ok)
    cases["multipart-two-files"] = Case(files=[("image", ("a.jpg", jpeg, "image/jpeg")),
                                               ("image", ("b.jpg", jpeg, "image/jpeg"))],
                                        status=422, error="bad_parameter")  # fmt: skip
    cases["multipart-no-file"] = Case(files=[("other", ("a.jpg", jpeg, "image/jpeg"))], status=422,
                                      error="bad_parameter")  # fmt: skip
    cases["multipart-image-as-text-field"] = Case(files=[("dummy", ("d", b"", "text/plain"))], data={"image": "abc"},
                                                  status=422, error="bad_parameter")  # fmt: skip
    cases["multipart-five-files"] = Case(files=[("image", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(5)],
                                         status=400, error="bad_request")  # fmt: skip
    cases["multipart-seventeen-fields"] = Case(files=[("image", ("a.jpg", jpeg, "image/jpeg"))],
                                               data={f"f{i}": "v" for i in range(17)}, status=400, error="bad_request")  # fmt: skip
    cases["multipart-without-boundary"] = Case(b"--x\r\n", "multipart/form-data", status=400, error="bad_request")
    cases["multipart-garbage-body"] = Case(b"\x00\xff" * 500, "multipart/form-data; boundary=zz", status=400,
                                           error="bad_request")  # fmt: skip
    # query parameters: model names are dictionary keys, never paths
    cases["model-path-traversal"] = Case(jpeg, params={"model": "../../../../etc/passwd"}, status=404, error="unknown_model")
    cases["model-absolute-path"] = Case(jpeg, params={"model": "/work/models/deeplabv3_mnv2_dm05_pascal_quant.tflite"},
                                        status=404, error="unknown_model")  # fmt: skip
    cases["model-with-nul"] = Case(jpeg, params={"model": "dm05\x00"}, status=404, error="unknown_model")
    cases["model-name-too-long"] = Case(jpeg, params={"model": "x" * 300}, status=422, error="bad_parameter")
    cases["format-unknown"] = Case(jpeg, params={"format": "../png"}, status=422, error="bad_parameter")
    return cases


CASES = build_cases()


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["detail"], str) and body["detail"]
    return str(body["error"])


def assert_serving(d: Daemon, image: bytes | None = None) -> None:
    """The daemon answers health checks and still segments a good image."""
    image = image or GOOD_IMAGE
    with httpx.Client(base_url=d.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.post("/segment", content=image, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert read_mask_png(r.content).shape == (43, 64)


GOOD_IMAGE = cv_encode(_photo(43, 64), ".jpg")


def send(d: Daemon, case: Case) -> httpx.Response:
    headers = {} if case.content_type is None else {"content-type": case.content_type}
    with httpx.Client(base_url=d.url, timeout=60) as c:
        if case.files is not None:
            return c.post("/segment", params=case.params, files=case.files, data=case.data or None)
        return c.post("/segment", params=case.params, content=case.body, headers=headers)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_gets_its_documented_answer_and_the_server_keeps_serving(
    daemon: Daemon, engine: Segmenter, name: str
) -> None:
    case = CASES[name]
    r = send(daemon, case)
    assert r.status_code == case.status, r.text
    if case.status != 200:
        assert r.headers["content-type"] == "application/json"
        assert error_of(r) == case.error
    elif case.params.get("format") == "json":
        assert r.json()["width"] > 0 and r.json()["classes"]
    else:
        mask = read_mask_png(r.content)
        if case.mask_hw is not None:
            assert mask.shape == case.mask_hw
        body = case.body if case.files is None else case.files[0][1][1]
        expected = engine.segment(body, keep_aspect=case.params.get("keep_aspect") == "true", reduce=True).mask
        assert np.array_equal(mask, expected), "the daemon's mask differs from the engine's"
    assert_serving(daemon)


def test_the_table_covers_every_documented_client_error_status() -> None:
    assert {c.status for c in CASES.values()} >= {200, 400, 404, 413, 415, 422}


# ----------------------------------------------------------------------------------------------
# Below the application: raw sockets
# ----------------------------------------------------------------------------------------------
def port_of(d: Daemon) -> int:
    return int(d.url.rsplit(":", 1)[1])


def connect(d: Daemon, timeout: float = 15) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port_of(d)), timeout=timeout)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def json_error(raw: bytes) -> tuple[int, str]:
    import json

    status, headers, body = parse(raw)
    assert headers["content-type"] == "application/json", headers
    doc = json.loads(body)
    assert set(doc) == {"error", "detail"} and doc["detail"], doc
    return status, str(doc["error"])


def serve_meanwhile(d: Daemon, seconds: float) -> list[float]:
    """Segment requests sent one after another for ``seconds``: their latencies (all 200)."""
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=d.url, timeout=30) as c:
        while time.monotonic() < deadline:
            t = time.monotonic()
            r = c.post("/segment", content=GOOD_IMAGE, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - t)
    return latencies


def test_idle_connection_gets_408_at_the_header_deadline_and_others_are_served_meanwhile(daemon: Daemon) -> None:
    s = connect(daemon)
    t0 = time.monotonic()
    latencies = serve_meanwhile(daemon, HEADER_TIMEOUT * 0.75)
    raw = read_all(s)
    waited = time.monotonic() - t0
    assert json_error(raw) == (408, "request_timeout")
    assert HEADER_TIMEOUT - 0.2 < waited < HEADER_TIMEOUT + 3
    assert len(latencies) >= 3 and max(latencies) < 5
    assert_serving(daemon)


def test_trickled_headers_get_408_at_the_header_deadline_although_bytes_keep_coming(daemon: Daemon) -> None:
    s = connect(daemon)
    request = b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n" + b"X-Pad: y\r\n" * 100
    t0 = time.monotonic()
    try:
        for i in range(len(request)):
            s.send(request[i : i + 1])  # one byte every 50 ms: 1000+ bytes would take a minute
            time.sleep(0.05)
            if time.monotonic() - t0 > HEADER_TIMEOUT + 3:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    raw = read_all(s)
    assert time.monotonic() - t0 < HEADER_TIMEOUT + 3
    assert json_error(raw) == (408, "request_timeout")
    assert_serving(daemon)


def test_trickled_body_gets_408_at_the_body_deadline_while_others_are_served(daemon: Daemon) -> None:
    s = connect(daemon)
    s.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
              + f"Content-Length: {len(GOOD_IMAGE)}\r\n\r\n".encode() + GOOD_IMAGE[:100])  # fmt: skip
    stop = threading.Event()

    def trickle() -> None:
        for b in GOOD_IMAGE[100:]:
            if stop.wait(0.2):
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return

    t0 = time.monotonic()
    th = threading.Thread(target=trickle, daemon=True)
    th.start()
    latencies = serve_meanwhile(daemon, BODY_TIMEOUT * 0.75)
    raw = read_all(s)
    stop.set()
    assert json_error(raw) == (408, "request_timeout")
    assert BODY_TIMEOUT - 0.2 < time.monotonic() - t0 < BODY_TIMEOUT + 3
    assert max(latencies) < 5
    assert_serving(daemon)


def test_many_idle_connections_do_not_lock_other_clients_out(daemon: Daemon) -> None:
    """Before the header deadline existed, 64 idle sockets made the daemon answer 503 to every
    other client for as long as the attacker kept them open (uvicorn's limit_concurrency); with
    the deadline, until it expired. Now no connection count locks anyone out: served at once."""
    socks = [connect(daemon) for _ in range(80)]
    try:
        time.sleep(0.3)
        assert httpx.get(daemon.url + "/healthz", timeout=10).status_code == 200
        assert_serving(daemon)  # while they are held
        time.sleep(HEADER_TIMEOUT + 1)
        assert_serving(daemon)  # the attacker still has its sockets open, the daemon closed them
        closed = 0
        for s in socks:
            s.settimeout(2)
            raw = read_all(s)
            closed += json_error(raw) == (408, "request_timeout")
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()


def open_sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed while listing
            count += os.readlink(fd).startswith("socket:")
    return count


def test_client_that_stops_reading_its_response_is_dropped(daemon: Daemon) -> None:
    """The response (a ~9 MB overlay PNG of noise) fills the socket buffers; the daemon stops
    waiting for the reader after body_timeout and frees the connection (the kernel may still
    hold what was already written)."""
    noise = np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    upload = cv_encode(noise, ".png")
    pid = daemon.proc.pid
    time.sleep(0.5)
    baseline = open_sockets(pid)
    s = connect(daemon, timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"POST /segment?format=overlay&overlay_format=png HTTP/1.1\r\nHost: x\r\n"
              + f"Content-Type: image/png\r\nContent-Length: {len(upload)}\r\n\r\n".encode() + upload)  # fmt: skip
    first = s.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")  # the daemon answered and is stuck writing
    assert open_sockets(pid) == baseline + 1
    t0 = time.monotonic()
    latencies = serve_meanwhile(daemon, BODY_TIMEOUT / 2)
    while open_sockets(pid) > baseline:
        assert time.monotonic() - t0 < BODY_TIMEOUT + 5, "the stalled connection was never dropped"
        time.sleep(0.1)
    assert time.monotonic() - t0 > BODY_TIMEOUT / 2
    assert max(latencies) < 5
    s.close()
    assert_serving(daemon)


def test_client_vanishing_mid_upload_is_not_an_error(daemon: Daemon) -> None:
    for ctype in ("image/jpeg", "multipart/form-data; boundary=zz"):
        s = connect(daemon)
        s.sendall(f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n".encode()
                  + b"--zz\r\n" + b"x" * 5000)  # fmt: skip
        time.sleep(0.3)
        s.close()
    time.sleep(0.3)
    assert_serving(daemon)
    metrics = httpx.get(daemon.url + "/metrics").text
    assert f'segd_requests_total{{model="{DM05}",route="/segment",status="499"}}' in metrics
    assert 'status="500"' not in metrics
    assert "Traceback" not in daemon.output()


def test_declared_upload_over_the_limit_is_refused_before_the_body_is_read(daemon: Daemon) -> None:
    s = connect(daemon)
    s.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000000000\r\n\r\n")
    assert json_error(read_all(s)) == (413, "upload_too_large")
    assert_serving(daemon)


def _send_in_pieces(d: Daemon, data: bytes, piece: int) -> bytes:
    s = connect(d)
    try:
        for i in range(0, len(data), piece):
            s.sendall(data[i : i + piece])
            time.sleep(0.001)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return read_all(s)


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(20_000)) + b"\r\n",
        b"GET /healthz?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["one-1MB-header", "20000-headers", "200KB-url"],
)
def test_oversized_request_heads_get_431_json(daemon: Daemon, request_head: bytes) -> None:
    """uvicorn/h11 refuse a request head that grows past 64 KiB while incomplete; segd's protocol
    answers 431 with the JSON error (uvicorn alone sends a plain-text 400)."""
    raw = _send_in_pieces(daemon, request_head, 8192)
    assert json_error(raw) == (431, "headers_too_large")
    assert_serving(daemon)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST /segment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: image/png\r\n\r\nzz\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
    ],
    ids=["garbage-line", "bad-content-length", "nul-in-header", "header-without-colon", "two-content-lengths",
         "bad-chunk-size", "tls-hello"],
)  # fmt: skip
def test_malformed_http_gets_400_json(daemon: Daemon, request_bytes: bytes) -> None:
    s = connect(daemon)
    s.sendall(request_bytes)
    assert json_error(read_all(s)) == (400, "bad_request")
    assert_serving(daemon)


def test_chunked_transfer_wins_over_content_length(daemon: Daemon) -> None:
    """RFC 9112 6.3: with both headers, Transfer-Encoding decides the body (h11 does so); the
    empty chunked body is then an empty image, not a request-smuggling gap."""
    s = connect(daemon)
    s.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5\r\n"
              b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n")  # fmt: skip
    assert json_error(read_all(s)) == (400, "empty_image")
    assert_serving(daemon)


def test_unknown_paths_and_methods_are_json_errors(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url, timeout=10) as c:
        for method, path, status, code in [
            ("GET", "/models/..%2f..%2fetc%2fpasswd", 404, "not_found"),
            ("GET", "/models/%2e%2e", 404, "unknown_model"),
            ("GET", "/../../etc/passwd", 404, "not_found"),
            ("GET", "/static/../../../etc/passwd", 404, "not_found"),
            ("PUT", "/segment", 405, "method_not_allowed"),
            ("DELETE", "/models", 405, "method_not_allowed"),
        ]:
            r = c.request(method, path)
            assert r.status_code == status and error_of(r) == code, (method, path, r.text)
    assert_serving(daemon)


def test_concurrent_hostile_mix_leaves_no_error_in_the_log(daemon: Daemon, engine: Segmenter) -> None:
    """Every table row at once from 8 clients: same answers, no 5xx, no traceback."""
    names = list(CASES) * 2

    def one(name: str) -> tuple[str, int]:
        return name, send(daemon, CASES[name]).status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, names))
    wrong = [(n, s) for n, s in results if s != CASES[n].status]
    assert wrong == []
    assert_serving(daemon)
    assert "Traceback" not in daemon.output() and "unexpected error" not in daemon.output()



def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_concurrent_large_images_wait_for_each_other_instead_of_exhausting_memory(daemon: Daemon) -> None:
    """Six 19 MP overlays at once (1.4 MB PNGs, far under the upload limit). Before the pixel
    budget every one was decoded at the same time: +780 MB here, 1.6 GB for eight 40 MP images at
    the defaults — past the unit's MemoryMax=1G, an OOM kill. Now they queue for the budget
    (max_pixels by default): measured +260 MB."""
    side = 4400
    img = np.zeros((side, side, 3), np.uint8)
    img[:, :, 0] = np.linspace(0, 255, side, dtype=np.uint8)[None, :]
    png = cv_encode(img, ".png")
    pid = daemon.proc.pid
    base = rss_mb(pid)
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda _: httpx.post(daemon.url + "/segment", params={"format": "overlay"}, content=png,
                                                    headers={"content-type": "image/png"}, timeout=120), range(6)))  # fmt: skip
    finally:
        stop.set()
        sampler.join()
    assert [r.status_code for r in rs] == [200] * 6, [r.text for r in rs if r.status_code != 200]
    assert peak[0] - base < 450, f"RSS grew {peak[0] - base:.0f} MB"
    assert_serving(daemon)


def _tiff_with_unknown_tags(n: int) -> bytes:
    """An 8x8 grey TIFF whose IFD also holds ``n`` private tags libtiff does not know (each is
    a warning line from OpenCV's TIFF reader)."""
    h = w = 8
    known = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0),
             (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, h * w)]  # fmt: skip
    entries = sorted(known + [(40000 + i, 3, 1, 0) for i in range(n)])
    pix_off = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, typ, cnt, val in entries:
        out += struct.pack("<HHII", tag, typ, cnt, pix_off if tag == 273 else val)
    return out + struct.pack("<I", 0) + bytes(range(64))


def test_one_upload_cannot_flood_the_log(daemon: Daemon) -> None:
    """Codec libraries print a line per oddity: 100,000 broken PNG text chunks (1.2 MB) wrote
    100,000 lines, a TIFF with 3000 unknown tags 3000. Now the PNG is refused from its header
    (over 64 metadata chunks) and OpenCV's warnings are off in the daemon (errors stay)."""
    png = cv_encode(_photo(8, 8), ".png")
    broken_text = struct.pack(">I", 0) + b"tEXt" + struct.pack(">I", zlib.crc32(b"tEXt"))
    flood_png = png[:33] + broken_text * 100_000 + png[33:]
    tiff = _tiff_with_unknown_tags(3000)
    before = len(daemon.output().splitlines())
    with httpx.Client(base_url=daemon.url, timeout=60) as c:
        r = c.post("/segment", content=flood_png, headers={"content-type": "image/png"})
        assert r.status_code == 400 and error_of(r) == "bad_image" and "metadata chunks" in r.json()["detail"]
        ok = png[:33] + broken_text * 60 + png[33:]  # a few broken chunks: decoded, a few lines
        assert c.post("/segment", content=ok, headers={"content-type": "image/png"}).status_code == 200
        r = c.post("/segment", content=tiff, headers={"content-type": "image/tiff"})
        assert r.status_code == 200, r.text
    time.sleep(0.3)
    added = len(daemon.output().splitlines()) - before
    assert added <= 100, f"{added} log lines for three uploads"
    assert_serving(daemon)
