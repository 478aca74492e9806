"""Fuzzing the decode + preprocess path (everything between the request bytes and the input
tensor): Hypothesis draws a real file of one of the six formats — written from Coral's photos by
OpenCV and Pillow in many layouts — and mutates it the way broken and malicious files differ
from good ones: header fields set to boundary values (sizes, lengths, counts, offsets), bit
flips, truncation, inserted/deleted/duplicated ranges, headers spliced onto other bodies. A
second strategy feeds random bytes behind each format's magic.

The property (:func:`check_decode`): whatever the bytes, the pipeline either produces a
well-formed tensor consistent with the header it probed, or raises one of segd's typed errors
(which the daemon maps to 400/413/415) — never another exception, a crash, or a hang.

CI runs a bounded, deterministic sample (``SEGD_FUZZ_EXAMPLES``, default 1500 per strategy);
``bench/fuzz.py`` runs the long randomised campaign (Hypothesis, and coverage-guided with
atheris) whose figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from segd import preprocess
from segd.errors import BadImage, EmptyImage, ImageTooLarge, SegdError, UnsupportedImage

MAX_PIXELS = 4_000_000  # small, so the fuzzer reaches the limit checks often and never swaps
INPUT_HW = (513, 513)  # the Coral models' input
EXAMPLES = int(os.environ.get("SEGD_FUZZ_EXAMPLES", "1500"))
CASE_SECONDS = 20  # a single case slower than this is a hang

# ----------------------------------------------------------------------------------------------
# Seed corpus: real files of every format and layout segd reads
# ----------------------------------------------------------------------------------------------
MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBP",
          b"II*\x00", b"MM\x00*")  # fmt: skip


def _pil(img: np.ndarray, fmt: str, mode: str | None = None, **kw: Any) -> bytes:
    from PIL import Image

    im = Image.fromarray(img)
    if mode == "P":
        im = im.quantize(16)
    elif mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _pil_frames(first: np.ndarray, more: list[np.ndarray], fmt: str, **kw: Any) -> bytes:
    """A multi-frame file (APNG, multi-page TIFF) written by Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(first).save(buf, fmt, save_all=True, append_images=[Image.fromarray(m) for m in more], **kw)
    return buf.getvalue()


def _cv(img_rgb: np.ndarray, ext: str, *params: int) -> bytes:
    img = cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR) if img_rgb.ndim == 3 and img_rgb.shape[2] == 3 else img_rgb
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok, ext
    return bytes(buf.tobytes())


def _animation(ext: str, frames: list[np.ndarray]) -> bytes:
    anim = cv2.Animation()
    anim.frames = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]
    anim.durations = [80] * len(frames)
    ok, buf = cv2.imencodeanimation(ext, anim)
    assert ok
    return bytes(buf.tobytes())


def _exif(orientation: int) -> bytes:
    entry = struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"II*\x00" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def seed_corpus(data_dir: Path, size: tuple[int, int] = (36, 48)) -> dict[str, bytes]:
    """Small real files (Coral's bird and cat photos at ``size``) in the layouts segd decodes:
    baseline/progressive/grey/CMYK/EXIF JPEG; RGB/RGBA/16-bit/palette/grey/EXIF/animated PNG;
    24/32-bit and palette BMP; static and animated GIF; lossy/lossless/alpha/animated WebP;
    raw/LZW/deflate/PackBits/JPEG-compressed/16-bit/big-endian/multi-page TIFF; APNG with and
    without its default image among the frames."""
    h, w = size
    photos = []
    for name in ("bird.bmp", "cat.bmp"):
        bgr = cv2.imread(str(data_dir / name))
        photos.append(cv2.cvtColor(cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    bird, cat = photos
    alpha = np.dstack([bird, np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)])
    img16 = bird.astype(np.uint16) * 257
    jpeg = _cv(bird, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90)
    png = _cv(cat, ".png")
    app1 = b"Exif\x00\x00" + _exif(6)
    corpus = {
        "jpeg": jpeg,
        "jpeg-progressive": _cv(cat, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "jpeg-grey": _pil(bird, "JPEG", "L"),
        "jpeg-cmyk": _pil(cat, "JPEG", "CMYK"),
        "jpeg-exif-6": jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:],
        "png": png,
        "png-rgba": _cv(cv2.cvtColor(alpha, cv2.COLOR_RGBA2BGRA), ".png"),
        "png-16bit": _cv(img16, ".png"),
        "png-palette": _pil(bird, "PNG", "P", transparency=0),
        "png-grey-1bit": _pil(cat, "PNG", "1"),
        "png-exif-8": png[:33] + _png_chunk(b"eXIf", _exif(8)) + png[33:],
        "png-animated": _animation(".png", [bird, cat]),
        # APNG whose default image is not a frame (no fcTL before IDAT), as in the upload that
        # killed the daemon in OpenCV's APNG reader
        "png-apng-default-image": _pil_frames(bird, [cat, 255 - bird], "PNG", default_image=True, duration=80),
        "bmp": _cv(bird, ".bmp"),
        "bmp-32bit": _cv(cv2.cvtColor(alpha, cv2.COLOR_RGBA2BGRA), ".bmp"),
        "bmp-palette": _pil(cat, "BMP", "P"),
        "gif": _cv(bird, ".gif"),
        "gif-animated": _animation(".gif", [cat, bird, 255 - cat]),
        "webp-lossy": _cv(bird, ".webp", cv2.IMWRITE_WEBP_QUALITY, 80),
        "webp-lossless": _cv(cat, ".webp", cv2.IMWRITE_WEBP_QUALITY, 101),
        "webp-alpha": _pil(alpha, "WEBP", quality=80),
        "webp-animated": _animation(".webp", [bird, cat]),
        "tiff": _cv(bird, ".tiff", cv2.IMWRITE_TIFF_COMPRESSION, 1),
        "tiff-lzw": _pil(cat, "TIFF", compression="tiff_lzw"),
        "tiff-deflate": _pil(bird, "TIFF", compression="tiff_deflate"),
        "tiff-packbits": _pil(cat, "TIFF", compression="packbits"),
        "tiff-jpeg": _pil(bird, "TIFF", compression="jpeg"),
        "tiff-16bit": _cv(img16, ".tiff"),
        "tiff-big-endian": _tiff_big_endian(cat),
        "tiff-multipage": _pil_frames(bird, [cat, 255 - cat], "TIFF", compression="tiff_lzw"),
    }
    return corpus


def _tiff_big_endian(rgb: np.ndarray) -> bytes:
    """Uncompressed big-endian ("MM") RGB TIFF, one strip (OpenCV and Pillow write "II")."""
    h, w, _ = rgb.shape
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, 0), (259, 3, 1, 1 << 16), (262, 3, 1, 2 << 16),
               (273, 4, 1, 0), (277, 3, 1, 3 << 16), (278, 4, 1, h), (279, 4, 1, h * w * 3)]  # fmt: skip
    ifd_size = 2 + 12 * len(entries) + 4
    bps_off = 8 + ifd_size
    pix_off = bps_off + 6
    out = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", len(entries))
    for tag, typ, cnt, val in entries:
        if tag == 258:
            val = bps_off
        elif tag == 273:
            val = pix_off
        out += struct.pack(">HHII", tag, typ, cnt, val)
    return out + struct.pack(">I", 0) + struct.pack(">HHH", 8, 8, 8) + rgb.tobytes()


# ----------------------------------------------------------------------------------------------
# Where the structure is: offsets of header fields worth mutating
# ----------------------------------------------------------------------------------------------
def structure_offsets(data: bytes) -> list[int]:
    """Byte offsets of the fields a decoder sizes things from: JPEG marker segments (marker,
    length, SOF dimensions), PNG/RIFF chunk lengths and types, TIFF IFD entries, GIF block
    headers, the BMP headers. Mutating there reaches the parsers' edge cases far more often
    than uniform positions in compressed pixel data."""
    offs: set[int] = set(range(min(len(data), 64)))
    with contextlib.suppress(struct.error, IndexError):  # a mutated file's structure may end early
        _walk(data, offs)
    return sorted(offs)


def _walk(data: bytes, offs: set[int]) -> None:
    n = len(data)
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= n and data[pos] == 0xFF:
            marker = data[pos + 1]
            offs.update(range(pos, min(n, pos + (12 if marker in (0xC0, 0xC1, 0xC2) else 6))))
            if marker == 0xDA:
                break
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    elif data.startswith(b"\x89PNG"):
        pos = 8
        while pos + 8 <= n:
            offs.update(range(pos, min(n, pos + 12)))
            pos += 12 + struct.unpack_from(">I", data, pos)[0]
    elif data.startswith(b"RIFF"):
        pos = 12
        while pos + 8 <= n:
            offs.update(range(pos, min(n, pos + 24)))
            size = struct.unpack_from("<I", data, pos + 4)[0]
            if data[pos : pos + 4] in (b"ANIM", b"ANMF"):
                pos += 8 + (16 if data[pos : pos + 4] == b"ANMF" else 6)  # frame header, then sub-chunks
                continue
            pos += 8 + size + (size & 1)
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        e = "<" if data[0] == 0x49 else ">"
        ifd = struct.unpack_from(e + "I", data, 4)[0]
        if ifd + 2 <= n:
            count = struct.unpack_from(e + "H", data, ifd)[0]
            offs.update(range(ifd, min(n, ifd + 2 + 12 * count + 4)))
    elif data.startswith(b"GIF"):
        offs.update(i + k for i in range(n) if data[i] in (0x2C, 0x21) for k in range(10) if i + k < n)


INTERESTING = (0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0xFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)  # fmt: skip


def mutated_images(corpus: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    """A seed file with 1-4 structure-aware mutations."""
    names = sorted(corpus)

    @st.composite
    def mutated(draw: Callable[..., Any]) -> bytes:
        return _mutate(draw, corpus, names)

    return mutated()


def _mutate(draw: Callable[..., Any], corpus: dict[str, bytes], names: list[str]) -> bytes:
    data = bytearray(corpus[draw(st.sampled_from(names))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        offs = structure_offsets(bytes(data))
        at_structure = draw(st.booleans()) or draw(st.booleans())  # 3 of 4 in the structure
        pos = draw(st.sampled_from(offs)) if at_structure and offs else draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["int", "int", "int", "flip", "truncate", "insert", "delete", "duplicate",
                                   "splice", "append"]))  # fmt: skip
        if op == "int":
            width = draw(st.sampled_from([1, 2, 4]))
            value = draw(st.sampled_from(INTERESTING) | st.integers(0, 2 ** (8 * width) - 1)) % (2 ** (8 * width))
            raw = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
            data[pos : pos + width] = raw[: max(0, len(data) - pos)]
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "duplicate":
            n = draw(st.integers(1, 256))
            data[pos:pos] = data[pos : pos + n]
        elif op == "splice":
            other = corpus[draw(st.sampled_from(names))]
            data[pos:] = other[pos:]
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def magic_then_random() -> st.SearchStrategy[bytes]:
    """Each format's magic followed by random bytes: the probes' first-line checks."""
    return st.tuples(st.sampled_from(MAGICS), st.binary(max_size=600)).map(lambda t: t[0] + t[1])


# ----------------------------------------------------------------------------------------------
# The property
# ----------------------------------------------------------------------------------------------
EXPECTED_ERRORS = (BadImage, EmptyImage, UnsupportedImage, ImageTooLarge)
LUTS = (None, preprocess.input_lut((127.5, 127.5, 127.5), (127.5, 127.5, 127.5), 0.0078125, 0, np.int8))


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Turn a stuck case into a failure (SIGALRM, main thread only; C code is interrupted when
    it returns to Python: a true C-level hang still shows as a stuck test)."""

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"one case took over {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_decode(data: bytes, *, max_pixels: int = MAX_PIXELS, input_hw: tuple[int, int] = INPUT_HW) -> str:
    """Run the daemon's path (probe -> limits -> decode, JPEG-reduced as for a mask) and the
    model-input preparation; check the invariants; return the outcome ("ok" or the error code).

    Raises AssertionError for a broken invariant and lets any non-segd exception escape: both
    are fuzzing failures.
    """
    try:
        header = preprocess.probe_image(data)
        preprocess.check_limits(header, max_pixels)
        reduce = preprocess.choose_reduce(header, input_hw)
        image = preprocess.decode_image(data, max_pixels=max_pixels, reduce=reduce, header=header)
    except SegdError as exc:
        assert isinstance(exc, EXPECTED_ERRORS), f"unexpected error class {type(exc).__name__}: {exc}"
        assert exc.detail and exc.http_status in (400, 413, 415)
        return exc.code
    rgb = image.rgb
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
    assert image.header == header and image.original_hw == header.oriented_hw
    oh, ow = header.oriented_hw
    assert rgb.shape[:2] == (math.ceil(oh / image.reduce), math.ceil(ow / image.reduce))
    assert header.pixels <= max_pixels
    for keep_aspect in (False, True):
        fitted, (top, left, bh, bw) = preprocess.fit_to_input(rgb, input_hw, keep_aspect)
        assert fitted.shape == (*input_hw, 3) and fitted.dtype == np.uint8
        assert top == left == 0 and 1 <= bh <= input_hw[0] and 1 <= bw <= input_hw[1]
    for lut in LUTS:
        tensor = preprocess.quantize(fitted, lut)
        assert tensor.shape == (*input_hw, 3)
    return "ok"


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(test_data: Path) -> dict[str, bytes]:
    return seed_corpus(test_data)


def test_every_seed_decodes(corpus: dict[str, bytes]) -> None:
    """The mutations start from good files: each seed is a valid image of the size it was made."""
    outcomes = {name: check_decode(data) for name, data in corpus.items()}
    assert set(outcomes.values()) == {"ok"}, outcomes
    formats = {preprocess.probe_image(d).format for d in corpus.values()}
    assert formats == {"jpeg", "png", "bmp", "gif", "webp", "tiff"}


def test_structure_offsets_point_at_headers(corpus: dict[str, bytes]) -> None:
    jpeg = corpus["jpeg"]
    sof = jpeg.find(b"\xff\xc0")
    assert {sof, sof + 5, sof + 7} <= set(structure_offsets(jpeg))  # marker, height, width
    tiff = corpus["tiff-lzw"]
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    assert ifd > 64 and ifd + 2 in structure_offsets(tiff)  # Pillow writes the IFD after the pixels
    png = corpus["png"]
    idat = png.find(b"IDAT")
    assert idat - 4 in structure_offsets(png)


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # shared CI machines: hangs are caught by time_limit instead
    derandomize=True,  # CI sees the same cases every run; bench/fuzz.py explores randomly
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_real_files_decode_or_raise_a_typed_error(corpus: dict[str, bytes], data: st.DataObject) -> None:
    blob = data.draw(mutated_images(corpus), label="image bytes")
    with time_limit(CASE_SECONDS):
        check_decode(blob)


@FUZZ_SETTINGS
@given(blob=magic_then_random())
@example(blob=b"\xff\xd8\xff")  # a bare JPEG SOI + marker prefix
@example(blob=b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"\x00" * 13)
@example(blob=b"RIFF\xff\xff\xff\xffWEBPVP8X" + b"\xff" * 20)
@example(blob=b"MM\x00*\xff\xff\xff\xff")
def test_random_bytes_behind_a_magic_decode_or_raise_a_typed_error(blob: bytes) -> None:
    with time_limit(CASE_SECONDS):
        check_decode(blob)


def test_the_fuzzer_reaches_every_outcome(corpus: dict[str, bytes]) -> None:
    """A fuzzer that only ever produced one outcome would test nothing: a fixed sample of
    mutations must hit success and each of the typed errors."""
    from hypothesis import find

    outcomes: set[str] = set()

    def record(blob: bytes) -> bool:
        outcomes.add(check_decode(blob))
        return {"ok", "bad_image", "image_too_large", "unsupported_media_type", "empty_image"} <= outcomes

    find(mutated_images(corpus), record, settings=settings(max_examples=2000, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
                                                             suppress_health_check=list(HealthCheck)))  # fmt: skip
    assert {"ok", "bad_image", "image_too_large", "unsupported_media_type", "empty_image"} <= outcomes
