"""No image decoder can take the daemon down.

1. The policy for multi-frame files: only the default image is decoded. The APNG that killed
   the daemon (its IDAT has no fcTL in front, its first fdAT frame inflates to rows with PNG
   filter byte 7) still kills a process that hands it to OpenCV as is; segd strips the
   animation chunks first and segments the default image.
2. Defence in depth: decoding runs in supervised worker processes. A worker that really dies
   (the test hook aborts it) costs that one request a 400 naming the problem; the worker is
   replaced, requests in flight on other workers are answered, and later masks equal the
   engine's.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from conftest import read_mask_png
from daemon import Daemon, start_daemon

from segd.child import SHM_PREFIX
from segd.decode_worker import STANDING_BYTES, TEST_CRASH_MARKER, DecodePool
from segd.engine import Segmenter
from segd.errors import BadImage, ImageTooLarge
from segd.preprocess import decode_image, probe_image

DM05 = "deeplabv3_mnv2_dm05_pascal"
BIG = 10**8


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def crashing_apng(w: int = 4, h: int = 4, filter_byte: int = 7) -> bytes:
    """The upload from the report: acTL, a default image (IDAT) with no fcTL before it, then
    frame 1 (fcTL + fdAT) whose rows start with an invalid PNG filter byte."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(range(3 * w)) for _ in range(h))
    bad = b"".join(bytes([filter_byte]) + bytes(3 * w) for _ in range(h))
    fctl = struct.pack(">IIIIIHHBB", 0, w, h, 0, 0, 1, 10, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        png_chunk(b"IHDR", ihdr),
        png_chunk(b"acTL", struct.pack(">II", 2, 0)),
        png_chunk(b"IDAT", zlib.compress(rows)),
        png_chunk(b"fcTL", fctl),
        png_chunk(b"fdAT", struct.pack(">I", 1) + zlib.compress(bad)),
        png_chunk(b"IEND", b""),
    ))  # fmt: skip


def photo_jpeg(h: int = 240, w: int = 320, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def with_crash_marker(jpeg: bytes) -> bytes:
    """A valid JPEG carrying the test hook's marker in a COM segment."""
    com = b"\xff\xfe" + struct.pack(">H", 2 + len(TEST_CRASH_MARKER)) + TEST_CRASH_MARKER
    return jpeg[:2] + com + jpeg[2:]


def own_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}{os.getpid()}_")}


# --- the policy --------------------------------------------------------------------------------
def test_the_reported_apng_kills_a_process_that_gives_it_to_opencv_as_is(tmp_path: Path) -> None:
    path = tmp_path / "crash.png"
    path.write_bytes(crashing_apng())
    code = (
        "import sys, cv2, numpy as np\n"
        "cv2.imdecode(np.fromfile(sys.argv[1], np.uint8), cv2.IMREAD_UNCHANGED)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=60)
    assert proc.returncode < 0, (proc.returncode, proc.stderr[-500:])  # killed by a signal


def test_apng_decodes_to_its_default_image_only() -> None:
    data = crashing_apng()
    header = probe_image(data)
    assert header.frames == 2
    out = decode_image(data, max_pixels=BIG).rgb
    rows = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)  # the IDAT's RGB samples, every row
    np.testing.assert_array_equal(out, np.broadcast_to(rows, (4, 4, 3)))


def test_apng_whose_default_image_is_frame_zero_decodes_the_same() -> None:
    data = crashing_apng()
    fctl = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 4, 4, 0, 0, 1, 10, 0, 0))
    at = data.index(b"IDAT") - 4
    framed = data[:at] + fctl + data[at:]
    np.testing.assert_array_equal(
        decode_image(framed, max_pixels=BIG).rgb, decode_image(data, max_pixels=BIG).rgb
    )


# --- the worker pool ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    with DecodePool(2, timeout=30, crash_marker=TEST_CRASH_MARKER) as p:
        yield p


def decode_in(pool: DecodePool, data: bytes, reduce: int = 1) -> np.ndarray:
    return pool.decode(data, header=probe_image(data), reduce=reduce, max_pixels=BIG).rgb


def test_worker_decodes_exactly_what_the_in_process_decoder_does(pool: DecodePool) -> None:
    jpeg = photo_jpeg()
    for reduce in (1, 2, 4):
        np.testing.assert_array_equal(
            decode_in(pool, jpeg, reduce), decode_image(jpeg, max_pixels=BIG, reduce=reduce).rgb
        )
    np.testing.assert_array_equal(decode_in(pool, crashing_apng()), decode_image(crashing_apng(), max_pixels=BIG).rgb)


def all_workers_up(pool: DecodePool, deadline: float) -> set[int]:
    """The pool starts its workers in the background: wait until both are running."""
    while len(pool.pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return set(pool.pids)


def test_worker_errors_come_back_typed_and_are_not_crashes(pool: DecodePool) -> None:
    jpeg = photo_jpeg()
    all_workers_up(pool, time.monotonic() + 30)
    pids, crashes = pool.pids, pool.describe()["crashes"]
    truncated = jpeg[:-2]
    with pytest.raises(BadImage, match="no end-of-image marker"):
        decode_in(pool, truncated)
    with pytest.raises(ImageTooLarge, match="over the limit of 100 pixels"):
        pool.decode(jpeg, header=probe_image(jpeg), reduce=1, max_pixels=100)
    assert pool.describe()["crashes"] == crashes
    assert pool.pids == pids


def test_a_worker_that_dies_costs_one_request_400_and_is_replaced(pool: DecodePool) -> None:
    jpeg = photo_jpeg()
    deadline = time.monotonic() + 30
    before = all_workers_up(pool, deadline)
    crashes = pool.describe()["crashes"]
    with pytest.raises(BadImage, match=r"JPEG decoder crashed on this image \(killed by SIGABRT\)"):
        decode_in(pool, with_crash_marker(jpeg))
    assert pool.describe()["crashes"] == crashes + 1
    np.testing.assert_array_equal(decode_in(pool, jpeg), decode_image(jpeg, max_pixels=BIG).rgb)
    after = all_workers_up(pool, deadline)
    assert len(after) == 2 and len(after - before) == 1  # exactly the dead one was replaced
    assert own_segments() == set()  # no shared-memory file left behind


def test_decoded_pixels_outlive_the_segment_name(pool: DecodePool) -> None:
    jpeg = photo_jpeg(seed=3)
    rgb = decode_in(pool, jpeg)
    assert own_segments() == set()
    assert rgb.flags.c_contiguous and rgb.shape == (240, 320, 3)
    np.testing.assert_array_equal(rgb, decode_image(jpeg, max_pixels=BIG).rgb)


def test_each_answer_is_its_own_array_though_workers_reuse_their_segment(pool: DecodePool) -> None:
    """Small images come back through a worker's standing segment: an answer must not change
    when the same worker decodes the next image."""
    first_jpeg, second_jpeg = photo_jpeg(seed=4), photo_jpeg(seed=5)
    expected = decode_image(first_jpeg, max_pixels=BIG).rgb
    first = decode_in(pool, first_jpeg)
    for _ in range(4):  # both workers, whichever the pool hands out
        decode_in(pool, second_jpeg)
    np.testing.assert_array_equal(first, expected)


def test_an_image_larger_than_the_standing_segment_gets_a_segment_of_its_own(pool: DecodePool) -> None:
    h, w = 1800, STANDING_BYTES // (3 * 1800) + 16  # just over the standing segment
    jpeg = photo_jpeg(h, w, seed=6)
    rgb = decode_in(pool, jpeg)
    assert rgb.nbytes > STANDING_BYTES
    np.testing.assert_array_equal(rgb, decode_image(jpeg, max_pixels=BIG).rgb)
    small = photo_jpeg(seed=7)
    np.testing.assert_array_equal(decode_in(pool, small), decode_image(small, max_pixels=BIG).rgb)
    assert own_segments() == set()


def test_mutated_animation_chunks_never_reach_the_decoder(pool: DecodePool) -> None:
    """The report: mutating the APNG's animation chunks finds more crashers within seconds.
    Whatever those chunks say (filter bytes, frame sizes and offsets, sequence numbers, counts),
    the default image is what is decoded: no worker dies, every answer is that image. (Handed
    to OpenCV 5.0 as they are, 9 of the first 12 of these files kill the process.)"""
    rng = np.random.default_rng(11)
    expected = decode_image(crashing_apng(), max_pixels=BIG).rgb
    crashes = pool.describe()["crashes"]
    for _ in range(60):
        w = h = 4
        fw, fh = (int(v) for v in rng.integers(1, 5, 2))
        fctl = struct.pack(">IIIIIHHBB", 1, fw, fh, int(rng.integers(0, 5 - fw)), int(rng.integers(0, 5 - fh)),
                           1, 10, int(rng.integers(0, 3)), int(rng.integers(0, 2)))  # fmt: skip
        rows = b"".join(bytes([int(rng.integers(5, 256))]) + rng.bytes(3 * fw) for _ in range(fh))  # bad filter bytes
        data = b"".join((
            b"\x89PNG\r\n\x1a\n",
            png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
            png_chunk(b"acTL", struct.pack(">II", int(rng.integers(1, 4)), int(rng.integers(0, 3)))),
            png_chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + bytes(range(3 * w)) for _ in range(h)))),
            png_chunk(b"fcTL", fctl),
            png_chunk(b"fdAT", struct.pack(">I", 2) + zlib.compress(rows)),
            png_chunk(b"IEND", b""),
        ))  # fmt: skip
        np.testing.assert_array_equal(decode_in(pool, data), expected)
    assert pool.describe()["crashes"] == crashes


# --- over HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path_factory.mktemp("decode-isolation"), models_dir, "--model", DM05,
        "--accelerator", "cpu", env={"SEGD_TEST_HOOKS": "1", "SEGD_QUEUE_SIZE": "32"},
    )  # fmt: skip
    yield d
    d.stop()


def test_a_decoder_crash_answers_400_and_the_daemon_keeps_serving_exact_masks(
    daemon: Daemon, engine: Segmenter
) -> None:
    images = [photo_jpeg(seed=s) for s in range(6)]
    crash = with_crash_marker(images[0])
    with daemon.client() as c, ThreadPoolExecutor(8) as ex:
        # Crashes (raw body and multipart) while good requests are in flight.
        def good(i: int) -> httpx.Response:
            return c.post("/segment", content=images[i % 6], headers={"content-type": "image/jpeg"})

        def bad(multipart: bool) -> httpx.Response:
            if multipart:
                return c.post("/segment", files={"image": ("c.jpg", crash, "image/jpeg")})
            return c.post("/segment", content=crash, headers={"content-type": "image/jpeg"})

        jobs = [ex.submit(good, i) for i in range(12)] + [ex.submit(bad, m) for m in (False, True, False)]
        answers = [j.result() for j in jobs]
    for r in answers[12:]:
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["error"] == "bad_image"
        assert "decoder crashed on this image (killed by SIGABRT)" in body["detail"]
    for i, r in enumerate(answers[:12]):
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(read_mask_png(r.content), engine.segment(images[i % 6]).mask)
    assert daemon.proc.poll() is None
    with daemon.client() as c:
        r = c.post("/segment", content=images[5], headers={"content-type": "image/jpeg"})
        assert r.status_code == 200
        np.testing.assert_array_equal(read_mask_png(r.content), engine.segment(images[5]).mask)
        assert c.get("/healthz").status_code == 200
        metrics = c.get("/metrics").text
    assert "image decoder worker lost: decoder killed by SIGABRT" in daemon.output()
    crashes = re.search(r"^segd_decoder_crashes_total (\S+)$", metrics, re.M)
    assert crashes is not None and float(crashes.group(1)) >= 3, metrics
    assert re.search(r"^segd_decoder_workers_running ", metrics, re.M)


def test_the_reported_apng_is_segmented_not_fatal(daemon: Daemon, engine: Segmenter) -> None:
    data = crashing_apng(64, 48)
    with daemon.client() as c:
        for _ in range(3):
            r = c.post("/segment", content=data, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(read_mask_png(r.content), engine.segment(data).mask)
        r = c.post("/segment", files={"image": ("a.png", data, "image/png")})
        assert r.status_code == 200
    assert daemon.proc.poll() is None
    assert "SIGSEGV" not in daemon.output()
