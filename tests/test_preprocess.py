"""segd.preprocess: header probing, decompression-bomb and truncation refusal, decoding of every
supported format to RGB, EXIF orientation, JPEG DCT reduction, fit/pad, input quantization.

Test images are real files: written by OpenCV's encoders, by Pillow (CMYK JPEG), by the small
hand-written PNG/TIFF/RIFF writers below (for layouts OpenCV cannot write), Coral's photos.
"""

from __future__ import annotations

import io
import math
import struct
import tomllib
import tracemalloc
import zlib
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from segd.encode import encode_mask_png
from segd.errors import (
    BadImage,
    BadParameter,
    EmptyImage,
    ImageTooLarge,
    SegdError,
    UnsupportedImage,
)
from segd.labels import voc_palette
from segd.preprocess import (
    ALPHA_BACKGROUND,
    PAD_VALUE,
    ImageHeader,
    apply_orientation,
    choose_reduce,
    decode_image,
    fit_to_input,
    input_lut,
    probe_image,
    quantize,
)

REPO = Path(__file__).resolve().parent.parent
BIG = 10**8  # a pixel limit no test image reaches


# ----------------------------------------------------------------------------------------------
# Hand-written encoders for layouts OpenCV does not write
# ----------------------------------------------------------------------------------------------
def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + tag
        + payload
        + struct.pack(">I", zlib.crc32(tag + payload))
    )


def make_png(
    samples: np.ndarray,
    color_type: int,
    bit_depth: int,
    *,
    plte: bytes | None = None,
    trns: bytes | None = None,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    size: tuple[int, int] | None = None,
) -> bytes:
    """Non-interlaced PNG of any colour type / bit depth, filter 0 on every row.
    ``size=(w, h)`` overrides the IHDR dimensions (for crafted headers)."""
    arr = samples if samples.ndim == 3 else samples[:, :, None]
    h, w, _ = arr.shape
    if bit_depth == 16:
        rows = arr.astype(">u2").reshape(h, -1).view(np.uint8)
    elif bit_depth == 8:
        rows = arr.astype(np.uint8).reshape(h, -1)
    else:  # pack 1/2/4-bit samples, most significant bits first
        per = 8 // bit_depth
        flat = arr.reshape(h, -1).astype(np.uint8)
        flat = np.pad(flat, ((0, 0), (0, (-flat.shape[1]) % per)))
        shifts = np.array([8 - bit_depth * (k + 1) for k in range(per)], np.uint8)
        rows = (flat.reshape(h, -1, per) << shifts).sum(axis=2).astype(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    w_decl, h_decl = size or (w, h)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", w_decl, h_decl, bit_depth, color_type, 0, 0, 0)
    )
    for tag, payload in extra:
        out += png_chunk(tag, payload)
    if plte is not None:
        out += png_chunk(b"PLTE", plte)
    if trns is not None:
        out += png_chunk(b"tRNS", trns)
    return out + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def exif_block(orientation: int, little: bool = True, tag_type: int = 3) -> bytes:
    """TIFF-structured EXIF whose IFD0 holds just the Orientation tag (SHORT or LONG)."""
    e = "<" if little else ">"
    head = b"II*\x00" if little else b"MM\x00*"
    value = (
        struct.pack(e + "HH", orientation, 0)
        if tag_type == 3
        else struct.pack(e + "I", orientation)
    )
    entry = struct.pack(e + "HHI", 0x0112, tag_type, 1) + value
    return head + struct.pack(e + "IH", 8, 1) + entry + struct.pack(e + "I", 0)


def jpeg_with_exif(jpeg: bytes, orientation: int, little: bool = True, tag_type: int = 3) -> bytes:
    """Insert an APP1 Exif segment right after SOI, as cameras write it."""
    payload = b"Exif\x00\x00" + exif_block(orientation, little, tag_type)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def make_tiff(
    img: np.ndarray,
    *,
    little: bool = True,
    orientation: int | None = None,
    size: tuple[int, int] | None = None,
    tile: tuple[int, int] | None = None,
) -> bytes:
    """Uncompressed chunky TIFF (8/16-bit gray or RGB), one strip, IFD right after the header."""
    e = "<" if little else ">"
    arr = img if img.ndim == 3 else img[:, :, None]
    h, w, c = arr.shape
    pix = arr.astype(arr.dtype.newbyteorder(e)).tobytes()
    w_decl, h_decl = size or (w, h)
    entries: list[tuple[int, int, int, bytes]] = []

    def add(tag: int, typ: int, *vals: int) -> None:
        code = "H" if typ == 3 else "I"
        entries.append((tag, typ, len(vals), struct.pack(e + code * len(vals), *vals)))

    add(256, 4, w_decl)
    add(257, 4, h_decl)
    add(258, 3, *([arr.dtype.itemsize * 8] * c))
    add(259, 3, 1)
    add(262, 3, 2 if c >= 3 else 1)
    add(273 if tile is None else 324, 4, 0)  # strip/tile offset, patched below
    if orientation is not None:
        add(274, 3, orientation)
    add(277, 3, c)
    if tile is None:
        add(278, 4, h)
        add(279, 4, len(pix))
    else:  # declare one tile (crafted headers only: the data does not match)
        add(322, 4, tile[0])
        add(323, 4, tile[1])
        add(325, 4, len(pix))
    entries.sort()
    extra_off = 8 + 2 + 12 * len(entries) + 4
    extra = b""
    fields = []
    for _tag, _typ, _cnt, val in entries:
        if len(val) > 4:
            fields.append(struct.pack(e + "I", extra_off + len(extra)))
            extra += val
        else:
            fields.append(val.ljust(4, b"\x00"))
    pix_off = extra_off + len(extra)
    ifd = struct.pack(e + "H", len(entries))
    for (tag, typ, cnt, _val), field in zip(entries, fields, strict=True):
        if tag in (273, 324):
            field = struct.pack(e + "I", pix_off)
        ifd += struct.pack(e + "HHI", tag, typ, cnt) + field
    ifd += struct.pack(e + "I", 0)
    return (b"II*\x00" if little else b"MM\x00*") + struct.pack(e + "I", 8) + ifd + extra + pix


def riff(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"WEBP"
    for cc, payload in chunks:
        body += cc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 12
    while pos + 8 <= len(data):
        cc, size = struct.unpack_from("<4sI", data, pos)
        out.append((cc, data[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return out


def vp8x(width: int, height: int, flags: int) -> bytes:
    return (
        bytes([flags, 0, 0, 0])
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )


def cv_encode(img_rgb: np.ndarray, ext: str, params: tuple[int, ...] = ()) -> bytes:
    """Encode RGB (or gray, or RGBA) with OpenCV, which wants BGR(A)."""
    if img_rgb.ndim == 3 and img_rgb.shape[2] == 3:
        img = cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR)
    elif img_rgb.ndim == 3 and img_rgb.shape[2] == 4:
        img = cv2.cvtColor(img_rgb, cv2.COLOR_RGBA2BGRA)
    else:
        img = img_rgb
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def orient_reference(stored: np.ndarray, orientation: int) -> np.ndarray:
    """Display image from stored pixels, straight from the EXIF table: stored row 0 / column 0
    are the visual (1) top/left (2) top/right (3) bottom/right (4) bottom/left (5) left/top
    (6) right/top (7) right/bottom (8) left/bottom. Pixel by pixel, no library transforms."""
    h, w = stored.shape[:2]
    vh, vw = (w, h) if orientation >= 5 else (h, w)
    out = np.zeros((vh, vw, *stored.shape[2:]), stored.dtype)
    for i in range(h):
        for j in range(w):
            r, c = {
                1: (i, j),
                2: (i, vw - 1 - j),
                3: (vh - 1 - i, vw - 1 - j),
                4: (vh - 1 - i, j),
                5: (j, i),
                6: (j, vw - 1 - i),
                7: (vh - 1 - j, vw - 1 - i),
                8: (vh - 1 - j, i),
            }[orientation]
            out[r, c] = stored[i, j]
    return out


def blocks(h: int, w: int, seed: int = 0, block: int = 8) -> np.ndarray:
    """Asymmetric RGB image of flat blocks (survives JPEG well, every orientation differs)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (math.ceil(h / block), math.ceil(w / block), 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, block, 0), block, 1)[:h, :w])


def assert_rgb(img: np.ndarray, hw: tuple[int, int]) -> None:
    assert img.dtype == np.uint8 and img.shape == (*hw, 3) and img.flags.c_contiguous


# ----------------------------------------------------------------------------------------------
# Probe: every format's header
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".gif", ".webp", ".tiff"])
def test_probe_reads_size_of_every_format_written_by_opencv(ext: str) -> None:
    data = cv_encode(blocks(37, 53), ext)
    header = probe_image(data)
    assert (header.width, header.height) == (53, 37)
    assert header.format == {".jpg": "jpeg", ".tiff": "tiff"}.get(ext, ext[1:])
    assert header.complete and header.orientation == 1 and header.oriented_hw == (37, 53)


def test_probe_reads_webp_lossy_lossless_and_extended_headers() -> None:
    img = blocks(21, 34)
    lossy = cv_encode(img, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 80))
    lossless = cv_encode(img, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))
    assert riff_chunks(lossy)[0][0] == b"VP8 " and riff_chunks(lossless)[0][0] == b"VP8L"
    extended = riff([(b"VP8X", vp8x(34, 21, 0)), riff_chunks(lossless)[0]])
    for data in (lossy, lossless, extended):
        h = probe_image(data)
        assert (h.format, h.width, h.height) == ("webp", 34, 21)


def test_probe_reads_both_tiff_byte_orders_and_16_bit() -> None:
    img16 = np.random.default_rng(3).integers(0, 65536, (5, 11, 3), dtype=np.uint16)
    for little in (True, False):
        h = probe_image(make_tiff(img16, little=little))
        assert (h.width, h.height, h.bit_depth, h.channels) == (11, 5, 16, 3)


def test_probe_reads_bmp_top_down_height_as_positive() -> None:
    img = blocks(6, 10)
    data = bytearray(cv_encode(img, ".bmp"))
    (height,) = struct.unpack_from("<i", data, 22)
    assert height == 6
    # Turn the bottom-up file into a top-down one: negative height, rows reversed.
    (offset,) = struct.unpack_from("<I", data, 10)
    stride = (10 * 3 + 3) // 4 * 4
    rows = [bytes(data[offset + r * stride : offset + (r + 1) * stride]) for r in range(6)]
    struct.pack_into("<i", data, 22, -6)
    data[offset:] = b"".join(reversed(rows))
    header = probe_image(bytes(data))
    assert (header.width, header.height) == (10, 6)
    np.testing.assert_array_equal(decode_image(bytes(data), max_pixels=BIG).rgb, img)


def test_probe_reads_jpeg_cmyk_components_and_png_palette_alpha() -> None:
    pil = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    pil.fromarray(blocks(8, 8)).convert("CMYK").save(buf, "JPEG")
    assert probe_image(buf.getvalue()).channels == 4
    pal = voc_palette(4).tobytes()
    png = make_png(np.zeros((2, 2), np.uint8), 3, 8, plte=pal, trns=b"\x00")
    assert probe_image(png).has_alpha


def test_probe_counts_frames_of_animations() -> None:
    frames = [np.full((12, 16, 3), v, np.uint8) for v in (0, 100, 200)]
    anim = cv2.Animation()
    anim.frames = frames
    anim.durations = [100, 100, 100]
    for ext in (".gif", ".webp", ".png"):
        ok, buf = cv2.imencodeanimation(ext, anim)
        assert ok
        assert probe_image(buf.tobytes()).frames == 3, ext


@pytest.mark.parametrize(
    "data",
    [
        b"hello world, definitely not an image",
        b"%PDF-1.7\n...",
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00",
        b"II+\x00\x08\x00\x00\x00",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\xff\xd8",
        b"R",
    ],
)
def test_probe_refuses_non_images_as_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImage):
        probe_image(data)


def test_probe_refuses_random_bytes_as_unsupported() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        data = rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
        if data[:2] in (b"BM", b"\xff\xd8", b"GI", b"\x89P", b"RI", b"II", b"MM"):
            continue
        with pytest.raises(UnsupportedImage):
            decode_image(data, max_pixels=BIG)


def test_empty_data_is_an_empty_image() -> None:
    with pytest.raises(EmptyImage):
        probe_image(b"")
    with pytest.raises(EmptyImage):
        decode_image(b"", max_pixels=BIG)


def test_zero_dimensions_are_empty_images() -> None:
    jpeg = bytearray(cv_encode(blocks(8, 8), ".jpg"))
    sof = jpeg.find(b"\xff\xc0")
    struct.pack_into(">H", jpeg, sof + 5, 0)  # height 0
    bmp = bytearray(cv_encode(blocks(4, 4), ".bmp"))
    struct.pack_into("<i", bmp, 18, 0)
    gif = bytearray(cv_encode(blocks(4, 4), ".gif"))
    struct.pack_into("<H", gif, 6, 0)
    cases = {
        "png": make_png(np.zeros((1, 1), np.uint8), 0, 8, size=(0, 1)),
        "jpeg": bytes(jpeg),
        "bmp": bytes(bmp),
        "gif": bytes(gif),
        "tiff": make_tiff(np.zeros((1, 1), np.uint8), size=(5, 0)),
        "webp": riff([(b"VP8 ", b"\x10\x02\x00\x9d\x01\x2a\x00\x00\x05\x00" + b"\x00" * 10)]),
    }
    for name, data in cases.items():
        with pytest.raises(EmptyImage):
            probe_image(data)
        assert name


def test_broken_headers_of_known_formats_are_bad_images() -> None:
    png = cv_encode(blocks(4, 4), ".png")
    bad_png_depth = bytearray(png)
    bad_png_depth[24] = 3  # bit depth 3 does not exist
    bmp = bytearray(cv_encode(blocks(4, 4), ".bmp"))
    struct.pack_into("<I", bmp, 14, 99)  # unknown DIB header size
    tiff = bytearray(make_tiff(blocks(4, 4)))
    struct.pack_into("<I", tiff, 4, 10**6)  # first IFD outside the file
    cases = [
        png[:20],
        bytes(bad_png_depth),
        bytes(bmp),
        b"BM\x00\x00",
        b"GIF89a\x01",
        bytes(tiff),
        b"RIFF\x10\x00\x00\x00WEBPXXXX\x04\x00\x00\x00abcd",
        b"\xff\xd8\xff\xe0\x00\x01",  # segment length 1
        b"\xff\xd8\xff\xda\x00\x02",  # scan before frame header
    ]
    for data in cases:
        with pytest.raises(BadImage) as info:
            probe_image(data)
        assert not isinstance(info.value, EmptyImage), data[:12]


# ----------------------------------------------------------------------------------------------
# Decompression bombs
# ----------------------------------------------------------------------------------------------
def _bomb_headers(side: int) -> dict[str, bytes]:
    """Tiny files declaring side x side pixels (or the format's maximum)."""
    jpeg = bytearray(cv_encode(blocks(8, 8), ".jpg"))
    sof = jpeg.find(b"\xff\xc0")
    struct.pack_into(">HH", jpeg, sof + 5, min(side, 65535), min(side, 65535))
    bmp = bytearray(cv_encode(blocks(2, 2), ".bmp"))
    struct.pack_into("<ii", bmp, 18, side, -side)
    gif = bytearray(cv_encode(blocks(2, 2), ".gif"))
    struct.pack_into("<HH", gif, 6, min(side, 65535), min(side, 65535))
    lossless = cv_encode(blocks(2, 2), ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))
    s = min(side, 1 << 24)
    return {
        "png": make_png(np.zeros((1, 1), np.uint8), 0, 8, size=(side, side)),
        "jpeg": bytes(jpeg),
        "bmp": bytes(bmp),
        "gif": bytes(gif),
        "webp-vp8x": riff([(b"VP8X", vp8x(s, s, 0)), riff_chunks(lossless)[0]]),
        "webp-vp8l": riff(
            [(b"VP8L", b"\x2f" + struct.pack("<I", (16383 << 14) | 16383) + b"\x00" * 8)]
        ),
        "webp-vp8": riff([(b"VP8 ", b"\x10\x02\x00\x9d\x01\x2a\xff\x3f\xff\x3f" + b"\x00" * 10)]),
        "tiff": make_tiff(np.zeros((1, 1), np.uint8), size=(side, side)),
        "tiff-be": make_tiff(np.zeros((1, 1), np.uint8), little=False, size=(side, side)),
    }


@pytest.mark.parametrize("name", list(_bomb_headers(100_000)))
def test_bomb_headers_are_refused_before_any_allocation(name: str) -> None:
    data = _bomb_headers(100_000)[name]
    header = probe_image(data)
    assert header.pixels >= 16383 * 16383
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as info:
            decode_image(data, max_pixels=50_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    msg = str(info.value)
    assert f"{header.width}x{header.height}" in msg and "50000000" in msg


@pytest.mark.parametrize("ext", [".png", ".jpg", ".gif", ".webp", ".tiff"])
def test_valid_oversized_image_is_refused_without_decoding_it(ext: str) -> None:
    # A real, decodable 2000x1500 image (3 MP = 9 MB of RGB): refused at a 1 MP limit with
    # a peak traced allocation far below its pixel size; the positive control shows the same
    # measurement sees a real decode (OpenCV's outputs are numpy arrays, traced).
    img = np.zeros((1500, 2000, 3), np.uint8)
    img[::50] = 255
    data = cv_encode(img, ext)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge, match="2000x1500 = 3000000 pixels"):
            decode_image(data, max_pixels=1_000_000)
        _, refused_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        decoded = decode_image(data, max_pixels=3_000_000)
        _, decoded_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.rgb.shape == (1500, 2000, 3)
    assert refused_peak < 1_000_000 < 9_000_000 <= decoded_peak


def test_limit_is_inclusive() -> None:
    data = cv_encode(blocks(10, 20), ".png")
    assert decode_image(data, max_pixels=200).rgb.shape == (10, 20, 3)
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=199)


def test_codec_side_limits_are_reported_as_too_large_not_corrupt() -> None:
    # 1_000_001 x 1 is only 1 MP, but libpng (inside OpenCV) refuses sides over 10^6.
    data = make_png(np.zeros((1, 1_000_001), np.uint8), 0, 8)
    with pytest.raises(ImageTooLarge, match="1000000"):
        decode_image(data, max_pixels=BIG)
    ok = make_png(np.zeros((1, 1_000_000), np.uint8), 0, 8)
    assert decode_image(ok, max_pixels=BIG).rgb.shape == (1, 1_000_000, 3)
    # libjpeg refuses sides over 65500 although a JPEG header can say 65535.
    jpeg = bytearray(cv_encode(np.zeros((1, 8, 3), np.uint8), ".jpg"))
    sof = jpeg.find(b"\xff\xc0")
    struct.pack_into(">H", jpeg, sof + 7, 65501)
    with pytest.raises(ImageTooLarge, match="65500"):
        decode_image(bytes(jpeg), max_pixels=BIG)


def test_opencv_pixel_limit_from_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    data = cv_encode(blocks(30, 30), ".png")
    monkeypatch.setenv("CV_IO_MAX_IMAGE_PIXELS", "800")
    with pytest.raises(ImageTooLarge, match="OpenCV"):
        decode_image(data, max_pixels=BIG)
    monkeypatch.setenv("CV_IO_MAX_IMAGE_WIDTH", "29")
    monkeypatch.setenv("CV_IO_MAX_IMAGE_PIXELS", "10000")
    with pytest.raises(ImageTooLarge, match="OpenCV"):
        decode_image(data, max_pixels=BIG)


def test_huge_tiff_tile_is_refused() -> None:
    data = make_tiff(blocks(4, 4), tile=(40000, 40000))
    with pytest.raises(ImageTooLarge, match="tile"):
        decode_image(data, max_pixels=10_000_000)


def test_gif_frame_outside_the_screen_is_bad() -> None:
    gif = bytearray(cv_encode(blocks(4, 4), ".gif"))
    desc = gif.find(b"\x2c\x00\x00\x00\x00")
    struct.pack_into("<HH", gif, desc + 5, 60000, 60000)  # frame far larger than the 4x4 screen
    with pytest.raises(BadImage, match="outside"):
        decode_image(bytes(gif), max_pixels=BIG)


def test_webp_animation_frame_outside_the_canvas_is_bad() -> None:
    anim = cv2.Animation()
    anim.frames = [np.full((12, 16, 3), v, np.uint8) for v in (0, 200)]
    anim.durations = [100, 100]
    ok, buf = cv2.imencodeanimation(".webp", anim)
    assert ok
    data = bytearray(buf.tobytes())
    anmf = data.find(b"ANMF")
    data[anmf + 8 + 6 : anmf + 8 + 9] = (999).to_bytes(3, "little")  # frame width 1000
    with pytest.raises(BadImage, match="outside"):
        decode_image(bytes(data), max_pixels=BIG)


# ----------------------------------------------------------------------------------------------
# Truncation, corruption: always a typed error, never a crash or a half-grey picture
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".gif", ".webp", ".tiff"])
def test_every_truncation_is_refused_as_bad_image(ext: str) -> None:
    data = cv_encode(blocks(24, 40, seed=2), ext)
    assert decode_image(data, max_pixels=BIG).rgb.shape == (24, 40, 3)
    step = max(1, len(data) // 400)
    for cut in range(12, len(data), step):  # from 12 bytes on, every format's magic is there
        with pytest.raises(BadImage):
            decode_image(data[:cut], max_pixels=BIG)
    with pytest.raises(BadImage):
        decode_image(data[:-1], max_pixels=BIG)


def test_truncated_jpeg_message_says_truncated() -> None:
    data = cv_encode(blocks(64, 64), ".jpg")
    with pytest.raises(BadImage, match="truncated"):
        decode_image(data[: len(data) * 3 // 4], max_pixels=BIG)


def test_trailing_bytes_after_a_complete_image_are_tolerated() -> None:
    img = blocks(16, 16)
    for ext in (".jpg", ".png", ".gif", ".webp", ".bmp"):
        data = cv_encode(img, ext) + b"\x00trailing junk\xff"
        assert decode_image(data, max_pixels=BIG).rgb.shape == (16, 16, 3), ext


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".gif", ".webp", ".tiff"])
def test_corrupted_files_give_an_image_or_a_typed_error(ext: str) -> None:
    data = cv_encode(blocks(24, 40, seed=5), ext)
    rng = np.random.default_rng(11)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 6))):
            buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
        try:
            out = decode_image(bytes(buf), max_pixels=1_000_000)
        except SegdError:
            outcomes["error"] += 1
        else:
            assert out.rgb.dtype == np.uint8 and out.rgb.ndim == 3 and out.rgb.shape[2] == 3
            assert out.rgb.flags.c_contiguous
            outcomes["ok"] += 1
    assert outcomes["error"] > 0  # the corruption is real enough to be noticed sometimes


# ----------------------------------------------------------------------------------------------
# Decoding every format to RGB uint8
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff", ".webp"])
def test_lossless_formats_decode_exactly(ext: str) -> None:
    img = blocks(33, 47, seed=4, block=3)
    params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()
    out = decode_image(cv_encode(img, ext, params), max_pixels=BIG)
    assert_rgb(out.rgb, (33, 47))
    np.testing.assert_array_equal(out.rgb, img)
    assert out.original_hw == (33, 47) and out.reduce == 1


def test_jpeg_decodes_to_rgb_not_bgr() -> None:
    img = np.zeros((16, 48, 3), np.uint8)
    img[:, :16] = (255, 0, 0)
    img[:, 16:32] = (0, 255, 0)
    img[:, 32:] = (0, 0, 255)
    out = decode_image(cv_encode(img, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95)), max_pixels=BIG).rgb
    assert_rgb(out, (16, 48))
    assert np.abs(out[4:12, 4:12].astype(int) - (255, 0, 0)).max() < 8
    assert np.abs(out[4:12, 36:44].astype(int) - (0, 0, 255)).max() < 8


def test_progressive_and_grayscale_jpegs_decode() -> None:
    img = blocks(40, 56)
    prog = cv_encode(img, ".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 95))
    base = cv_encode(img, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95))
    assert b"\xff\xc2" in prog and b"\xff\xc2" not in base
    out = decode_image(prog, max_pixels=BIG).rgb
    # Same quantization, only the entropy coding differs: the same pixels.
    np.testing.assert_array_equal(out, decode_image(base, max_pixels=BIG).rgb)
    assert np.abs(out.astype(int) - img).mean() < 12  # 4:2:0 chroma on random 8x8 colours
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    out = decode_image(cv_encode(gray, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95)), max_pixels=BIG).rgb
    assert_rgb(out, (40, 56))
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 1], out[:, :, 2])
    assert np.abs(out[:, :, 0].astype(int) - gray).mean() < 3


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    pil = pytest.importorskip("PIL.Image")
    img = np.zeros((16, 64, 3), np.uint8)
    colours = [(200, 30, 40), (20, 180, 60), (30, 40, 220), (250, 250, 250)]
    for k, c in enumerate(colours):
        img[:, 16 * k : 16 * (k + 1)] = c
    buf = io.BytesIO()
    pil.fromarray(img).convert("CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert probe_image(data).channels == 4
    out = decode_image(data, max_pixels=BIG).rgb
    assert_rgb(out, (16, 64))
    for k, c in enumerate(colours):
        patch = out[4:12, 16 * k + 4 : 16 * k + 12].astype(int)
        assert np.abs(patch - c).max() <= 6, (c, patch[0, 0])


def test_16_bit_png_and_tiff_are_scaled_with_rounding() -> None:
    rng = np.random.default_rng(9)
    img16 = rng.integers(0, 65536, (9, 13, 3), dtype=np.uint16)
    img16[0, :3, 0] = [128, 129, 65535]  # 128/257 rounds down, 129/257 up; truncation gives 0, 0
    expected = np.floor(img16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert expected[0, 0, 0] == 0 and expected[0, 1, 0] == 1
    for data in (
        make_png(img16, 2, 16),
        cv_encode(img16, ".png"),  # OpenCV writes it BGR; cv_encode swaps to keep RGB
        make_tiff(img16),
        make_tiff(img16, little=False),
    ):
        out = decode_image(data, max_pixels=BIG).rgb
        assert_rgb(out, (9, 13))
        np.testing.assert_array_equal(out, expected)


def test_gray_pngs_of_every_bit_depth_become_rgb() -> None:
    rng = np.random.default_rng(10)
    for depth in (1, 2, 4, 8, 16):
        levels = rng.integers(0, 2**depth, (7, 11)).astype(np.uint16 if depth == 16 else np.uint8)
        out = decode_image(make_png(levels, 0, depth), max_pixels=BIG).rgb
        scale = 255 / (2**depth - 1)
        expected = np.floor(levels.astype(np.float64) * scale + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(out, np.repeat(expected[:, :, None], 3, axis=2), str(depth))


def test_palette_pngs_decode_to_palette_colours() -> None:
    rng = np.random.default_rng(12)
    for depth in (1, 2, 4, 8):
        pal = rng.integers(0, 256, (2**depth, 3), dtype=np.uint8)
        idx = rng.integers(0, 2**depth, (6, 17)).astype(np.uint8)
        out = decode_image(make_png(idx, 3, depth, plte=pal.tobytes()), max_pixels=BIG).rgb
        np.testing.assert_array_equal(out, pal[idx], str(depth))


def test_segd_mask_png_decodes_as_palette_colours() -> None:
    mask = (np.arange(30 * 40).reshape(30, 40) % 21).astype(np.uint8)
    pal = voc_palette()
    data = encode_mask_png(mask, pal)
    header = probe_image(data)
    assert (header.format, header.width, header.height, header.bit_depth) == ("png", 40, 30, 8)
    np.testing.assert_array_equal(decode_image(data, max_pixels=BIG).rgb, pal[mask])


def _composite_reference(rgb: np.ndarray, alpha: np.ndarray, full: int) -> np.ndarray:
    a = alpha.astype(np.float64)[:, :, None] / full
    c = rgb.astype(np.float64) / full * 255
    return np.floor(c * a + ALPHA_BACKGROUND * (1 - a) + 0.5).astype(np.uint8)


def test_alpha_is_composited_over_grey() -> None:
    rng = np.random.default_rng(13)
    rgba = rng.integers(0, 256, (10, 12, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    expected = _composite_reference(rgba[:, :, :3], rgba[:, :, 3], 255)
    assert tuple(expected[0, 0]) == (ALPHA_BACKGROUND,) * 3
    np.testing.assert_array_equal(expected[0, 1], rgba[0, 1, :3])
    for data in (
        cv_encode(rgba, ".png"),
        make_png(rgba, 6, 8),
        cv_encode(rgba, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
    ):
        out = decode_image(data, max_pixels=BIG).rgb
        assert_rgb(out, (10, 12))
        np.testing.assert_array_equal(out, expected)


def test_16_bit_alpha_and_gray_alpha_are_composited() -> None:
    rng = np.random.default_rng(14)
    rgba16 = rng.integers(0, 65536, (6, 9, 4), dtype=np.uint16)
    expected = _composite_reference(rgba16[:, :, :3], rgba16[:, :, 3], 65535)
    out = decode_image(make_png(rgba16, 6, 16), max_pixels=BIG).rgb
    assert np.abs(out.astype(int) - expected).max() <= 1  # float64 reference vs exact integers
    ga = rng.integers(0, 256, (6, 9, 2), dtype=np.uint8)
    expected = _composite_reference(np.repeat(ga[:, :, :1], 3, axis=2), ga[:, :, 1], 255)
    np.testing.assert_array_equal(decode_image(make_png(ga, 4, 8), max_pixels=BIG).rgb, expected)


def test_palette_transparency_is_composited() -> None:
    pal = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    out = decode_image(make_png(idx, 3, 8, plte=pal.tobytes(), trns=b"\x00"), max_pixels=BIG).rgb
    np.testing.assert_array_equal(out[0, 0], (ALPHA_BACKGROUND,) * 3)
    np.testing.assert_array_equal(out[0, 1], (0, 255, 0))


def test_bmp_32_bit_with_unused_alpha_is_opaque_and_real_alpha_composites() -> None:
    img = blocks(5, 7)
    zero_alpha = np.concatenate([img, np.zeros((5, 7, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(
        decode_image(cv_encode(zero_alpha, ".bmp"), max_pixels=BIG).rgb, img
    )
    half = zero_alpha.copy()
    half[:, :, 3] = 255
    half[0, 0, 3] = 0
    out = decode_image(cv_encode(half, ".bmp"), max_pixels=BIG).rgb
    np.testing.assert_array_equal(out[0, 0], (ALPHA_BACKGROUND,) * 3)
    np.testing.assert_array_equal(out[1:], img[1:])


def test_gif_decodes_like_opencv_and_transparency_is_grey() -> None:
    img = blocks(20, 30, block=5)
    data = cv_encode(img, ".gif")
    ours = decode_image(data, max_pixels=BIG).rgb
    np.testing.assert_array_equal(
        ours, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    )
    assert np.abs(ours.astype(int) - img).mean() < 40  # 256-colour quantization
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[:, :, 0] = 255
    rgba[5:, :, 3] = 255
    anim = cv2.Animation()
    anim.frames = [cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)]
    anim.durations = [100]
    ok, buf = cv2.imencodeanimation(".gif", anim)
    assert ok
    out = decode_image(buf.tobytes(), max_pixels=BIG).rgb
    np.testing.assert_array_equal(out[0, 0], (ALPHA_BACKGROUND,) * 3)
    assert out[9, 0, 0] > 240 and out[9, 0, 1] < 10


@pytest.mark.parametrize("ext", [".gif", ".webp", ".png"])
def test_animations_decode_their_first_frame(ext: str) -> None:
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    anim = cv2.Animation()
    anim.frames = [np.full((12, 16, 3), c[::-1], np.uint8) for c in colours]
    anim.durations = [100, 100, 100]
    ok, buf = cv2.imencodeanimation(ext, anim)
    assert ok
    out = decode_image(buf.tobytes(), max_pixels=BIG).rgb
    assert_rgb(out, (12, 16))
    dist = [np.abs(out.astype(int) - c).mean() for c in colours]
    assert dist[0] < 10 and dist[0] < min(dist[1:]) / 10  # GIF: palette + dithering


def test_tiny_images_decode() -> None:
    for h, w in ((1, 1), (1, 9), (9, 1)):
        img = blocks(h, w, block=1)
        for ext in (".png", ".bmp", ".tiff", ".gif", ".webp", ".jpg"):
            params = (cv2.IMWRITE_WEBP_QUALITY, 101) if ext == ".webp" else ()
            out = decode_image(cv_encode(img, ext, params), max_pixels=BIG)
            assert_rgb(out.rgb, (h, w))
            assert out.original_hw == (h, w)
            if ext in (".png", ".bmp", ".tiff", ".webp"):
                np.testing.assert_array_equal(out.rgb, img, f"{ext} {h}x{w}")


def test_coral_photos_decode_exactly(test_data: Path) -> None:
    for name in ("bird.bmp", "cat.bmp", "bird_segmentation.bmp"):
        data = (test_data / name).read_bytes()
        out = decode_image(data, max_pixels=BIG)
        reference = cv2.imread(str(test_data / name), cv2.IMREAD_COLOR_RGB)
        assert_rgb(out.rgb, reference.shape[:2])
        np.testing.assert_array_equal(out.rgb, reference)


def test_unsupported_sample_type_is_a_typed_error() -> None:
    data = cv_encode(np.random.default_rng(0).random((4, 5, 3), dtype=np.float32), ".tiff")
    with pytest.raises(UnsupportedImage, match="float32"):
        decode_image(data, max_pixels=BIG)


def test_bad_arguments_are_bad_parameters() -> None:
    data = cv_encode(blocks(4, 4), ".png")
    with pytest.raises(BadParameter):
        decode_image(data, max_pixels=BIG, reduce=3)
    with pytest.raises(BadParameter):
        decode_image(data, max_pixels=0)


# ----------------------------------------------------------------------------------------------
# EXIF orientation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("little", [True, False])
def test_jpeg_exif_orientation_puts_pixels_where_the_table_says(
    orientation: int, little: bool
) -> None:
    stored = blocks(24, 40, seed=orientation)
    plain = cv_encode(stored, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 100))
    data = jpeg_with_exif(plain, orientation, little)
    # The same JPEG decoded without orientation: what the file stores, after JPEG loss.
    stored_decoded = decode_image(plain, max_pixels=BIG).rgb
    out = decode_image(data, max_pixels=BIG)
    expected = orient_reference(stored_decoded, orientation)
    assert out.header.orientation == orientation
    assert out.original_hw == expected.shape[:2]
    assert_rgb(out.rgb, expected.shape[:2])
    np.testing.assert_array_equal(out.rgb, expected)
    # OpenCV's own EXIF handling (without IGNORE_ORIENTATION) agrees.
    np.testing.assert_array_equal(
        out.rgb, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    )


def test_exif_orientation_stored_as_long_is_read() -> None:
    plain = cv_encode(blocks(8, 16), ".jpg")
    assert probe_image(jpeg_with_exif(plain, 6, tag_type=4)).orientation == 6


@pytest.mark.parametrize("bogus", [0, 9, 255, 65535])
def test_bogus_orientation_values_are_ignored(bogus: int) -> None:
    stored = blocks(8, 16)
    plain = cv_encode(stored, ".png")
    for data in (
        jpeg_with_exif(cv_encode(stored, ".jpg"), bogus),
        make_png(stored, 2, 8, extra=((b"eXIf", exif_block(bogus)),)),
        make_tiff(stored, orientation=bogus),
    ):
        out = decode_image(data, max_pixels=BIG)
        assert out.header.orientation == 1 and out.original_hw == (8, 16)
    np.testing.assert_array_equal(decode_image(plain, max_pixels=BIG).rgb, stored)


def test_malformed_exif_does_not_reject_the_image() -> None:
    stored = blocks(8, 16)
    plain = cv_encode(stored, ".jpg")
    junk = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"  # IFD offset far outside the segment
    data = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + plain[2:]
    out = decode_image(data, max_pixels=BIG)
    assert out.header.orientation == 1 and out.rgb.shape == (8, 16, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_webp_tiff_orientation_is_applied_once(orientation: int) -> None:
    stored = blocks(6, 10, seed=orientation, block=1)
    expected = orient_reference(stored, orientation)
    lossless = riff_chunks(cv_encode(stored, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)))[0]
    files = {
        "png": make_png(stored, 2, 8, extra=((b"eXIf", exif_block(orientation)),)),
        "webp": riff([(b"VP8X", vp8x(10, 6, 0x08)), lossless, (b"EXIF", exif_block(orientation))]),
        "tiff": make_tiff(stored, orientation=orientation),
        "tiff-be": make_tiff(stored, little=False, orientation=orientation),
    }
    for name, data in files.items():
        out = decode_image(data, max_pixels=BIG)
        assert out.original_hw == expected.shape[:2], name
        np.testing.assert_array_equal(out.rgb, expected, name)


def test_apply_orientation_matches_the_table_for_gray_and_colour() -> None:
    rng = np.random.default_rng(15)
    for shape in ((5, 7, 3), (5, 7)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        for o in range(1, 9):
            np.testing.assert_array_equal(apply_orientation(img, o), orient_reference(img, o))


# ----------------------------------------------------------------------------------------------
# JPEG DCT reduction
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_reduced_jpeg_keeps_original_size_and_is_close_to_full_decode(
    test_data: Path, reduce: int
) -> None:
    photo = cv2.imread(str(test_data / "bird.bmp"), cv2.IMREAD_COLOR_RGB)
    data = cv_encode(photo, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95))
    full = decode_image(data, max_pixels=BIG)
    out = decode_image(data, max_pixels=BIG, reduce=reduce)
    h, w = photo.shape[:2]
    assert out.reduce == reduce and out.original_hw == (h, w) == full.original_hw
    assert_rgb(out.rgb, (math.ceil(h / reduce), math.ceil(w / reduce)))
    resized = cv2.resize(full.rgb, out.rgb.shape[1::-1], interpolation=cv2.INTER_AREA)
    diff = np.abs(out.rgb.astype(int) - resized)
    assert diff.mean() < 4.0
    other = np.abs(np.roll(out.rgb, 7, axis=1).astype(int) - resized).mean()
    assert other > 3 * diff.mean()  # the comparison can tell a wrong image


@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_reduced_jpeg_is_libjpegs_scaled_decode_in_rgb(test_data: Path, reduce: int) -> None:
    photo = cv2.imread(str(test_data / "bird.bmp"), cv2.IMREAD_COLOR)
    data = cv_encode(photo, ".jpg")
    flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    out = decode_image(data, max_pixels=BIG, reduce=reduce).rgb
    np.testing.assert_array_equal(out, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def test_reduced_jpeg_with_orientation_reports_oriented_full_size() -> None:
    stored = blocks(64, 96)
    data = jpeg_with_exif(cv_encode(stored, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95)), 6)
    out = decode_image(data, max_pixels=BIG, reduce=4)
    assert out.original_hw == (96, 64)
    assert out.rgb.shape == (24, 16, 3)
    full = decode_image(data, max_pixels=BIG).rgb
    small = cv2.resize(full, (16, 24), interpolation=cv2.INTER_AREA)
    assert np.abs(out.rgb.astype(int) - small).mean() < 8


def test_reduce_is_ignored_for_non_jpeg() -> None:
    img = blocks(40, 40)
    out = decode_image(cv_encode(img, ".png"), max_pixels=BIG, reduce=4)
    assert out.reduce == 1
    np.testing.assert_array_equal(out.rgb, img)


def test_choose_reduce_keeps_the_decode_at_least_model_sized() -> None:
    def jpeg(w: int, h: int, o: int = 1) -> ImageHeader:
        return ImageHeader("jpeg", w, h, orientation=o)

    assert choose_reduce(jpeg(4000, 3000), (513, 513)) == 4  # 750 >= 513, 375 < 513
    assert choose_reduce(jpeg(4104, 4104), (513, 513)) == 8
    assert choose_reduce(jpeg(4103, 4103), (513, 513)) == 8  # ceil(4103/8) = 513
    assert choose_reduce(jpeg(4096, 4096), (513, 513)) == 4
    assert choose_reduce(jpeg(600, 600), (513, 513)) == 1
    assert choose_reduce(jpeg(500, 500), (513, 513)) == 1
    # Orientation swaps the axes compared with the (H, W) model input.
    assert choose_reduce(jpeg(1100, 4200, o=1), (513, 1026)) == 1
    assert choose_reduce(jpeg(1100, 4200, o=6), (513, 1026)) == 2
    assert choose_reduce(ImageHeader("png", 4000, 3000), (513, 513)) == 1
    # Property: the choice never undershoots the input, and the next factor would.
    for w, h in ((1027, 1027), (2052, 1100), (8000, 513 * 8), (513, 9000)):
        got = choose_reduce(jpeg(w, h), (513, 513))
        assert math.ceil(h / got) >= 513 and math.ceil(w / got) >= 513
        if got < 8:
            assert math.ceil(h / (2 * got)) < 513 or math.ceil(w / (2 * got)) < 513


# ----------------------------------------------------------------------------------------------
# Fit to the model input
# ----------------------------------------------------------------------------------------------
def test_fit_returns_same_object_when_already_input_sized() -> None:
    img = blocks(513, 513)
    for keep in (True, False):
        out, box = fit_to_input(img, (513, 513), keep_aspect=keep)
        assert out is img and box == (0, 0, 513, 513)


def test_stretch_shrink_is_an_exact_area_average() -> None:
    # Factor 4: every output pixel is the mean of a 4x4 block (bilinear would see only 2x2).
    img = np.random.default_rng(16).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    out, box = fit_to_input(img, (20, 30), keep_aspect=False)
    assert box == (0, 0, 20, 30)
    mean = img.reshape(20, 4, 30, 4, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out.astype(int) - mean).max() <= 0.5 + 1e-9


def test_stretch_enlarge_interpolates_between_neighbours() -> None:
    img = np.array([[[0, 0, 0], [200, 100, 50]]], np.uint8).repeat(4, axis=0)  # 4 x 2
    out, _ = fit_to_input(img, (8, 8), keep_aspect=False)
    assert out.shape == (8, 8, 3)
    row = out[3, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 200 and np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 2  # linear, not nearest


def test_stretch_with_one_axis_shrinking_and_one_growing() -> None:
    # Columns constant down the rows: shrinking rows must not change values; widening
    # columns must interpolate like a linear resize of one row.
    row = np.random.default_rng(17).integers(0, 256, (1, 10, 3), dtype=np.uint8)
    img = np.repeat(row, 40, axis=0)  # 40 x 10
    out, _ = fit_to_input(img, (10, 25), keep_aspect=False)
    expected_row = cv2.resize(row, (25, 1), interpolation=cv2.INTER_LINEAR)
    assert out.shape == (10, 25, 3)
    np.testing.assert_array_equal(out, np.repeat(expected_row, 10, axis=0))


@pytest.mark.parametrize("hw", [(100, 200), (300, 120), (1, 700), (513, 600), (37, 37)])
def test_keep_aspect_places_image_top_left_and_pads_grey(hw: tuple[int, int]) -> None:
    img = blocks(*hw, seed=hw[0])
    out, (top, left, bh, bw) = fit_to_input(img, (513, 513), keep_aspect=True)
    assert out.shape == (513, 513, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (top, left) == (0, 0)
    scale = min(513 / hw[0], 513 / hw[1])
    assert max(bh, bw) == 513
    assert abs(bh - hw[0] * scale) <= 0.5 + 1e-9 and abs(bw - hw[1] * scale) <= 0.5 + 1e-9
    assert np.all(out[bh:] == PAD_VALUE) and np.all(out[:, bw:] == PAD_VALUE)
    stretched, _ = fit_to_input(img, (bh, bw), keep_aspect=False)
    np.testing.assert_array_equal(out[:bh, :bw], stretched)


def test_fit_rejects_non_rgb_input() -> None:
    with pytest.raises(BadParameter):
        fit_to_input(np.zeros((4, 4), np.uint8), (8, 8), keep_aspect=True)
    with pytest.raises(BadParameter):
        fit_to_input(np.zeros((4, 4, 3), np.float32), (8, 8), keep_aspect=True)
    with pytest.raises(BadParameter):
        fit_to_input(np.zeros((4, 4, 3), np.uint8), (0, 8), keep_aspect=False)


# ----------------------------------------------------------------------------------------------
# Input quantization
# ----------------------------------------------------------------------------------------------
def _exact_lut(
    mean: tuple[float, ...], std: tuple[float, ...], scale: float, zp: int, lo: int, hi: int
) -> np.ndarray:
    """Rational-arithmetic reference: clip(round_half_away((p - mean) / std / scale) + zp)."""
    out = np.zeros((3, 256), np.int64)
    for c in range(3):
        for p in range(256):
            x = (Fraction(p) - Fraction(mean[c])) / Fraction(std[c]) / Fraction(scale)
            r = math.floor(abs(x) + Fraction(1, 2)) * (1 if x >= 0 else -1)
            out[c, p] = min(hi, max(lo, r + zp))
    return out


LUT_CASES = [
    # mean, std, scale, zero point, dtype
    ((127.5,) * 3, (127.5,) * 3, 1 / 128, 128, np.uint8),
    ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 0.0186584, 114, np.uint8),
    ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 0.0186584, -14, np.int8),
    ((0.0,) * 3, (1.0,) * 3, 2.0, 0, np.uint8),  # exact halves: 0.5 -> 1, 1.5 -> 2, ...
    ((128.0,) * 3, (1.0,) * 3, 2.0, 0, np.int8),  # negative halves: -0.5 -> -1
    ((0.0,) * 3, (1.0,) * 3, 0.5, 10, np.uint8),  # saturates at 255
    ((0.0,) * 3, (255.0,) * 3, float(np.float32(1 / 255)), 0, np.uint8),  # identity
    ((0.0,) * 3, (255.0,) * 3, 1 / 256, 0, np.uint8),
    ((0.0,) * 3, (255.0,) * 3, float(np.float32(1 / 255)), -128, np.int8),
    ((128.0,) * 3, (128.0,) * 3, 1 / 4096, 0, np.int16),
]


@pytest.mark.parametrize(("mean", "std", "scale", "zp", "dtype"), LUT_CASES)
def test_input_lut_matches_exact_rational_reference(
    mean: tuple[float, ...], std: tuple[float, ...], scale: float, zp: int, dtype: type
) -> None:
    info = np.iinfo(dtype)
    expected = _exact_lut(mean, std, scale, zp, int(info.min), int(info.max))
    lut = input_lut(mean, std, scale, zp, dtype)
    if lut is None:  # only allowed when the mapping really is the identity
        assert dtype is np.uint8
        lut = np.tile(np.arange(256, dtype=np.uint8), (3, 1))
    assert lut.shape == (3, 256) and lut.dtype == dtype
    np.testing.assert_array_equal(lut.astype(np.int64), expected)


def test_input_lut_rounds_halves_away_from_zero() -> None:
    lut = input_lut((0.0,) * 3, (1.0,) * 3, 2.0, 0, np.uint8)
    assert lut is not None
    assert lut[0, :6].tolist() == [0, 1, 1, 2, 2, 3]  # half-to-even would give 0, 0, 1, 2, 2, 2
    lut8 = input_lut((128.0,) * 3, (1.0,) * 3, 2.0, 0, np.int8)
    assert lut8 is not None
    assert lut8[0, 125:132].tolist() == [-2, -1, -1, 0, 1, 1, 2]


def test_identity_mapping_gives_no_lut() -> None:
    assert input_lut((128.0,) * 3, (128.0,) * 3, 1 / 128, 128, np.uint8) is None
    exact = _exact_lut((128.0,) * 3, (128.0,) * 3, 1 / 128, 128, 0, 255)
    np.testing.assert_array_equal(exact, np.tile(np.arange(256), (3, 1)))
    assert input_lut((127.5,) * 3, (127.5,) * 3, 1 / 128, 128, np.uint8) is not None


def test_coral_models_need_no_input_conversion(test_data: Path) -> None:
    """The real models' input quantization with the manifest's mean/std is the identity.

    Edge-TPU-only variants (the original coral-deeplab files) have no CPU file to read: their
    inputs are scaled to 0..1 as the original code trained them, which is not the identity.
    """
    from ai_edge_litert.interpreter import Interpreter

    manifest = tomllib.loads((REPO / "models" / "variants.toml").read_text())
    checked = 0
    for variant in manifest["variants"].values():
        if "cpu" not in variant["files"]:
            continue
        checked += 1
        cpu = test_data / variant["files"]["cpu"]["name"]
        detail = Interpreter(model_path=str(cpu)).get_input_details()[0]
        scale, zp = detail["quantization"]
        assert detail["dtype"] == np.uint8 and scale > 0
        inp = variant["input"]
        assert input_lut(inp["mean"], inp["std"], scale, zp, detail["dtype"]) is None, cpu.name
    assert checked >= 3


def test_quantize_identity_returns_the_input_itself() -> None:
    img = blocks(9, 9)
    assert quantize(img, None) is img


@pytest.mark.parametrize(("mean", "std", "scale", "zp", "dtype"), LUT_CASES)
def test_quantize_applies_each_channels_table(
    mean: tuple[float, ...], std: tuple[float, ...], scale: float, zp: int, dtype: type
) -> None:
    img = np.random.default_rng(18).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    lut = input_lut(mean, std, scale, zp, dtype)
    out = quantize(img, lut)
    if lut is None:
        assert out is img
        return
    expected = np.stack([lut[c][img[:, :, c]] for c in range(3)], axis=2)
    assert out.dtype == np.dtype(dtype) and out.shape == img.shape
    np.testing.assert_array_equal(out, expected)


def test_float_input_is_normalized() -> None:
    img = np.random.default_rng(19).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    # A float input tensor (scale 1, zero point 0) goes through the same LUT path as the engine's.
    out = quantize(img, input_lut(mean, std, 1.0, 0, np.float32))
    expected = ((img.astype(np.float64) - mean) / std).astype(np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_lut_rejects_bad_parameters() -> None:
    with pytest.raises(BadParameter):
        input_lut((0.0, 0.0), (1.0,) * 3, 1.0, 0, np.uint8)
    with pytest.raises(BadParameter):
        input_lut((0.0,) * 3, (0.0,) * 3, 1.0, 0, np.uint8)
    with pytest.raises(BadParameter):
        input_lut((0.0,) * 3, (1.0,) * 3, 0.0, 0, np.uint8)
    with pytest.raises(BadParameter):
        input_lut((0.0,) * 3, (1.0,) * 3, 1.0, 0, np.float64)
    with pytest.raises(BadParameter):
        quantize(np.zeros((2, 2, 3), np.uint8), np.zeros((256, 3), np.uint8))
