"""Peak memory of one request, in bytes, on the real daemon: formats x bit depths x alpha x
output formats, each held to what the memory budget charges for it
(``segd.image.decode.request_bytes``, computed from the header before decoding).

Measured as the growth of peak RSS (VmHWM, reset through /proc/PID/clear_refs before each
request) of the daemon plus its decode worker. The decoded image lives in shared memory that
both processes touch, so it shows in both peaks: the sum is an upper bound of what the two used
together, and the budget counts those pages twice as well.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from daemon import Daemon, start_daemon

from segd.image.decode import choose_reduce, request_bytes
from segd.image.header import probe_image

DM05 = "deeplabv3_mnv2_dm05_pascal"
H, W = 1000, 1600  # 1.6 MP: the per-pixel costs dominate the fixed ones
MiB = 1024 * 1024


def picture(depth: int, alpha: bool) -> np.ndarray:
    """A smooth photo-like BGR(A) picture with some grain (compresses like a photo, not noise)."""
    rng = np.random.default_rng(depth * 2 + alpha)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    planes = [
        127 + 100 * np.sin(x / 97.0 + c) * np.cos(y / 131.0 - c) + rng.normal(0, 2, (H, W)).astype(np.float32)
        for c in range(4 if alpha else 3)
    ]
    if alpha:
        planes[3] = np.where((x // 300 + y // 300) % 3 == 0, 0, 255 - (x / W * 200)).astype(np.float32)
    img = np.clip(np.dstack(planes), 0, 255)
    return (img * 257).astype(np.uint16) if depth == 16 else img.astype(np.uint8)


CASES = [
    ("jpeg", 8, False), ("png", 8, False), ("png", 8, True), ("png", 16, False), ("png", 16, True),
    ("webp", 8, False), ("webp", 8, True), ("tiff", 8, False), ("tiff", 8, True), ("tiff", 16, False),
    ("tiff", 16, True),
]  # fmt: skip
OUTPUTS = ("json", "png", "overlay")
EXT = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "tiff": ".tiff"}


def encode(fmt: str, depth: int, alpha: bool) -> bytes:
    params = {"jpeg": [cv2.IMWRITE_JPEG_QUALITY, 90], "webp": [cv2.IMWRITE_WEBP_QUALITY, 80],
              "png": [cv2.IMWRITE_PNG_COMPRESSION, 1]}.get(fmt, [])  # fmt: skip
    ok, buf = cv2.imencode(EXT[fmt], picture(depth, alpha), params)
    assert ok
    data = buf.tobytes()
    header = probe_image(data)
    assert (header.format, header.bit_depth > 8, header.has_alpha) == (fmt, depth == 16, alpha)
    return data


def status(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", text, re.M)}


def decode_workers(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path_factory.mktemp("memory"), models_dir, "--model", DM05, "--accelerator", "cpu",
        env={"SEGD_DECODE_WORKERS": "1", "SEGD_MAX_UPLOAD_BYTES": str(64 * MiB)},
    )  # fmt: skip
    yield d
    d.stop()


def peak_growth(daemon: Daemon, fn: object) -> int:
    """Growth of parent + decode-worker peak RSS while ``fn`` runs (peaks reset first)."""
    pids = [daemon.proc.pid, *decode_workers(daemon.proc.pid)]
    assert len(pids) == 2, pids
    base = {}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        base[pid] = status(pid)["VmRSS"]
    fn()  # type: ignore[operator]
    return sum(max(0, status(pid)["VmHWM"] - base[pid]) for pid in pids)


@pytest.mark.timeout(240)
def test_peak_memory_per_request_stays_within_what_the_budget_charges(daemon: Daemon) -> None:
    rows = []
    with daemon.client() as c:
        while len(decode_workers(daemon.proc.pid)) < 1:
            time.sleep(0.05)
        for fmt, depth, alpha in CASES:
            data = encode(fmt, depth, alpha)
            header = probe_image(data)
            for out in OUTPUTS:
                params = {"format": out}

                def send() -> None:
                    r = c.post("/segment", params=params, content=data, headers={"content-type": "application/octet-stream"})  # noqa: B023
                    assert r.status_code == 200, r.text

                if (fmt, depth, alpha) == CASES[0] or out == OUTPUTS[0]:
                    send()  # warm: first-use allocations of a path are not per-request costs
                grown = peak_growth(daemon, send)
                reduce = choose_reduce(header, (513, 513)) if out != "overlay" else 1
                charged = request_bytes(header, reduce=reduce, output="overlay-jpeg" if out == "overlay" else out, upload=len(data))
                name = f"{fmt} {depth}-bit{' alpha' if alpha else ''} -> {out}"
                rows.append((name, grown, charged, len(data)))
    report = "\n".join(
        f"{name:32s} {g / (H * W):5.1f} B/px measured, {ch / (H * W):5.1f} charged, upload {n / (H * W):4.1f} B/px"
        for name, g, ch, n in rows
    )
    print(report)
    over = [r for r in rows if r[1] > r[2]]
    assert not over, report


def test_an_image_that_alone_exceeds_the_memory_budget_is_refused_before_decoding(daemon: Daemon) -> None:
    """The report's 6000x6000 16-bit RGBA PNG took +2.47 GB. Its header alone now says what it
    would cost: over the default budget (448 MiB), so 413 naming both figures, and nothing is
    decoded (this file has no real pixel data: a decoder would fail with 400)."""
    import struct
    import zlib

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 6000, 6000, 16, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))  # fmt: skip
    with daemon.client() as c:
        for fmt in ("json", "png", "overlay"):
            r = c.post("/segment", params={"format": fmt}, content=png, headers={"content-type": "image/png"})
            assert r.status_code == 413, r.text
            body = r.json()
            assert body["error"] == "image_too_large"
            assert "6000x6000 PNG image needs about" in body["detail"] and "memory budget of 448 MiB" in body["detail"]
        ok = encode("png", 8, False)
        assert c.post("/segment", content=ok, headers={"content-type": "image/png"}).status_code == 200
