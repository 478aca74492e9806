"""Image bytes -> oriented RGB uint8, and what a request may cost in memory.

:func:`decode_image` checks the probed header against the pixel limits, decodes with OpenCV
(only formats the probe understood ever reach OpenCV), converts to RGB uint8 and applies the
EXIF orientation itself (OpenCV is told to ignore it). In the daemon it runs inside a decode
worker process (:mod:`segd.decode_worker`) and writes straight into shared memory (``out``).

Policies (the safest for a long-running daemon):

- Multi-frame files are decoded by their default image only: the first frame of a GIF or an
  animated WebP, the first page of a TIFF, the IDAT image of an APNG (its animation chunks are
  removed before OpenCV sees the file, see :func:`_png_default_image`).
- Transparent pixels are composited over mid-grey ``ALPHA_BACKGROUND`` = 128, the same value
  used to pad letterboxed input: for the Coral models (mean = std = 128) that is float 0.0, the
  "no information" input, and it does not depend on whatever colour an encoder left hidden
  under alpha = 0. 32-bit BMPs whose alpha bytes are all zero are treated as opaque (that byte
  is commonly unused padding).
- 16-bit samples are scaled to 8 bits with rounding, ``round(v * 255 / 65535)``, not truncated;
  that and compositing run a strip of rows at a time, so no frame-sized wide temporaries.
"""

from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from segd.errors import BadImage, BadParameter, ImageTooLarge, UnsupportedImage
from segd.image.header import ImageHeader, probe_image
from segd.settings import environ_value

__all__ = [
    "ALPHA_BACKGROUND",
    "STRIP_PIXELS",
    "DecodedImage",
    "apply_orientation",
    "check_limits",
    "choose_reduce",
    "decode_image",
    "decoded_hw",
    "quiet_codec_warnings",
    "request_bytes",
]

ALPHA_BACKGROUND = 128
"""Grey that transparent pixels are composited over (= float 0.0 for mean=std=128 models)."""

_REDUCE_FLAGS = {
    1: 0,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
"""JPEG DCT scaling by 1/N. The REDUCED_GRAYSCALE flags are only the scale bits: with a colour
flag added they decode colour at 1/N (REDUCED_COLOR_N is the same bits plus IMREAD_COLOR)."""

# OpenCV refuses images over these (imgcodecs/src/loadsave.cpp); overridable by env vars that
# OpenCV reads once at first use.
_CV_DEFAULT_LIMITS = {
    "CV_IO_MAX_IMAGE_WIDTH": 1 << 20,
    "CV_IO_MAX_IMAGE_HEIGHT": 1 << 20,
    "CV_IO_MAX_IMAGE_PIXELS": 1 << 30,
}
# Per-format side limits of the libraries OpenCV uses: libpng's default user limit and
# libjpeg's JPEG_MAX_DIMENSION (a SOF may declare up to 65535).
_FORMAT_MAX_SIDE = {"png": 1_000_000, "jpeg": 65_500}


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """Decoded, oriented RGB pixels plus the full-resolution size they stand for.

    With JPEG DCT scaling (``reduce`` > 1) ``rgb`` is about 1/reduce of ``original_hw`` in each
    dimension; the mask is still produced at ``original_hw``.
    """

    rgb: np.ndarray  # H x W x 3 uint8, C-contiguous, oriented
    original_hw: tuple[int, int]  # (height, width) of the full image after orientation
    reduce: int  # reduction actually applied (1 unless JPEG DCT scaling was used)
    header: ImageHeader


def quiet_codec_warnings() -> None:
    """OpenCV logs a warning line per oddity of a decoded file (a TIFF with 4000 unknown tags:
    4000 lines), so one upload could flood the journal and push segd's own messages out of
    journald's rate limit; errors are still logged. Called by the daemon and its decode
    workers."""
    with contextlib.suppress(AttributeError):  # builds without the logging utilities
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _cv_limits() -> dict[str, int]:
    limits = dict(_CV_DEFAULT_LIMITS)
    for key in limits:
        raw = environ_value(key)
        if raw:
            with contextlib.suppress(ValueError):
                limits[key] = int(raw)
    return limits


def check_limits(header: ImageHeader, max_pixels: int) -> None:
    """Raise :class:`ImageTooLarge` if decoding ``header`` would exceed ``max_pixels`` or a
    limit of OpenCV / its codec libraries (so those surface as 413, not as a decode failure)."""
    w, h, fmt = header.width, header.height, header.format.upper()
    if header.pixels > max_pixels:
        raise ImageTooLarge(
            f"{fmt} image is {w}x{h} = {header.pixels} pixels, over the limit of {max_pixels} pixels"
        )
    if header.buffer_pixels > max_pixels:
        raise ImageTooLarge(
            f"{fmt} image needs a decoder buffer of {header.buffer_pixels} pixels "
            f"(e.g. a TIFF tile), over the limit of {max_pixels} pixels"
        )
    cv = _cv_limits()
    if w > cv["CV_IO_MAX_IMAGE_WIDTH"] or h > cv["CV_IO_MAX_IMAGE_HEIGHT"]:
        raise ImageTooLarge(
            f"{fmt} image is {w}x{h}, over OpenCV's side limit "
            f"{cv['CV_IO_MAX_IMAGE_WIDTH']}x{cv['CV_IO_MAX_IMAGE_HEIGHT']}"
        )
    if header.pixels > cv["CV_IO_MAX_IMAGE_PIXELS"]:
        raise ImageTooLarge(
            f"{fmt} image is {header.pixels} pixels, over OpenCV's limit of "
            f"{cv['CV_IO_MAX_IMAGE_PIXELS']} pixels"
        )
    side = _FORMAT_MAX_SIDE.get(header.format)
    if side is not None and max(w, h) > side:
        raise ImageTooLarge(f"{fmt} image is {w}x{h}; the {fmt} decoder refuses sides over {side}")


def choose_reduce(header: ImageHeader, model_input_hw: tuple[int, int]) -> int:
    """Largest JPEG DCT scaling factor (1, 2, 4, 8) that keeps the decoded image at least as
    large as the model input in both dimensions. Always 1 for other formats.

    libjpeg scales inside the IDCT, so decoding a 12 MP photo at 1/4 is several times faster
    and smaller than a full decode followed by a resize.
    """
    if header.format != "jpeg":
        return 1
    in_h, in_w = model_input_hw
    h, w = header.oriented_hw
    for r in (8, 4, 2):
        if math.ceil(h / r) >= in_h and math.ceil(w / r) >= in_w:
            return r
    return 1


def _imdecode_rgb(buf: np.ndarray, reduce: int = 1) -> np.ndarray | None:
    """JPEG decode to RGB at 1/``reduce`` scale; OpenCV < 4.11 has no IMREAD_COLOR_RGB (decode
    BGR, then swap in place)."""
    scale = _REDUCE_FLAGS[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
    flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    if flag is not None:
        out: np.ndarray | None = cv2.imdecode(buf, scale | flag)
        return out
    bgr = cv2.imdecode(buf, scale | cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)


def decoded_hw(header: ImageHeader, reduce: int = 1) -> tuple[int, int]:
    """(height, width) of what :func:`decode_image` returns for ``header``: oriented, and
    scaled by ``reduce`` for JPEG (DCT scaling rounds up)."""
    r = reduce if header.format == "jpeg" else 1
    h, w = header.oriented_hw
    return math.ceil(h / r), math.ceil(w / r)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    reduce: int = 1,
    header: ImageHeader | None = None,
    out: np.ndarray | None = None,
) -> DecodedImage:
    """Decode image bytes to oriented RGB uint8 (H x W x 3, C-contiguous).

    The header (as probed from these same bytes, or probed here) is checked first
    (:class:`ImageTooLarge` names the size and the limit), then truncated data is refused
    (:class:`BadImage`), then OpenCV decodes. ``reduce`` (1, 2, 4 or 8) asks for JPEG DCT
    scaling; other formats ignore it (``DecodedImage.reduce`` says what was applied). ``out``
    (:func:`decoded_hw` x 3, uint8) receives the pixels instead of a new array, e.g. a
    shared-memory segment. Only the default image of a multi-frame file is decoded.
    """
    if reduce not in (1, 2, 4, 8):
        raise BadParameter(f"reduce must be 1, 2, 4 or 8, not {reduce!r}")
    if max_pixels < 1:
        raise BadParameter(f"max_pixels must be positive, not {max_pixels}")
    if header is None:
        header = probe_image(data)
    check_limits(header, max_pixels)
    if header.defect is not None:
        raise BadImage(header.defect)
    if out is not None:
        hw = decoded_hw(header, reduce)
        if out.dtype != np.uint8 or out.shape != (*hw, 3):
            raise BadParameter(f"out must be a {hw} x 3 uint8 array")
    buf = np.frombuffer(data, dtype=np.uint8)
    fmt = header.format.upper()
    r = reduce if header.format == "jpeg" else 1
    try:
        if header.format == "jpeg":
            img = _imdecode_rgb(buf, r)
        else:
            if header.format == "tiff":
                buf = _tiff_without_orientation(data, buf, header)
            elif header.format == "png":
                buf = _png_default_image(data, buf)
            # UNCHANGED keeps 16-bit samples and alpha (and ignores EXIF orientation, except
            # for TIFF, see _tiff_without_orientation).
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise BadImage(
            f"{fmt} data could not be decoded: {str(exc).strip().splitlines()[-1]}"
        ) from exc
    del buf
    if img is None:
        raise BadImage(f"{fmt} data could not be decoded (corrupt image data)")
    expect = (math.ceil(header.height / r), math.ceil(header.width / r))
    if img.shape[:2] != expect:
        raise BadImage(
            f"{fmt} decoder produced {img.shape[1]}x{img.shape[0]} pixels, the header declares "
            f"{expect[1]}x{expect[0]}"
        )
    # RGB uint8 at the stored orientation, straight into ``out`` when nothing turns it.
    target = out if header.orientation == 1 else None
    rgb = img if header.format == "jpeg" else _to_rgb8(img, header, target)
    del img
    if header.orientation != 1 or (out is not None and rgb is not out):
        rgb = apply_orientation(rgb, header.orientation, out)  # orientation 1: a copy into out
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb), original_hw=header.oriented_hw, reduce=r, header=header
    )


_ANIMATION_CHUNKS = (b"acTL", b"fcTL", b"fdAT")


def _png_default_image(data: bytes, buf: np.ndarray) -> np.ndarray:
    """An APNG without its animation chunks (acTL, fcTL, fdAT): the default image (IDAT) only.

    segd's policy for every multi-frame format is "the default image". For APNG it is enforced
    here, before the decoder sees the file, because OpenCV's APNG reader (5.0) kills the
    process (SIGSEGV after "libpng error: bad adaptive filter value") on an animation frame
    whose rows carry an invalid filter byte. A plain PNG is returned as is (no copy)."""
    if not any(tag in data for tag in _ANIMATION_CHUNKS):
        return buf
    keep = [data[:8]]
    pos, n = 8, len(data)
    while pos + 8 <= n:
        (length,) = struct.unpack_from(">I", data, pos)
        end = min(n, pos + 12 + length)
        if data[pos + 4 : pos + 8] not in _ANIMATION_CHUNKS:
            keep.append(data[pos:end])
        pos = end
    keep.append(data[pos:])
    return np.frombuffer(b"".join(keep), dtype=np.uint8)


def _tiff_without_orientation(data: bytes, buf: np.ndarray, header: ImageHeader) -> np.ndarray:
    """OpenCV's TIFF reader applies the Orientation tag itself, whatever the flags say. To keep
    one code path (orientation applied once, here, for every format) hand it a copy with the
    tag value set to 1 (top-left). The probe recorded where the value is."""
    if header.tiff_orientation_at is None:
        return buf
    pos, code = header.tiff_orientation_at
    if struct.unpack_from(code, data, pos)[0] == 1:
        return buf
    patched = bytearray(data)
    struct.pack_into(code, patched, pos, 1)
    return np.frombuffer(patched, dtype=np.uint8)


STRIP_PIXELS = 1 << 16
"""Pixels converted per strip (16-bit -> 8-bit, alpha compositing): the wide temporaries of
that arithmetic are this big, never the size of the frame."""


def _to_rgb8(img: np.ndarray, header: ImageHeader, out: np.ndarray | None = None) -> np.ndarray:
    """OpenCV IMREAD_UNCHANGED output (gray/BGR/BGRA, 8/16-bit) -> RGB uint8, a strip of rows
    at a time, into ``out`` (a new array when None)."""
    if img.dtype not in (np.uint8, np.uint16):
        raise UnsupportedImage(
            f"{header.format.upper()} image with {img.dtype} samples is not supported "
            "(8- and 16-bit integer images only)"
        )
    if img.ndim == 2:
        img = img[:, :, None]
    h, w, ch = img.shape
    if ch not in (1, 2, 3, 4):
        raise UnsupportedImage(f"{header.format.upper()} image with {ch} channels is not supported")
    has_alpha = ch in (2, 4)
    if has_alpha and header.format == "bmp" and not img[:, :, ch - 1].any():
        has_alpha = False  # 32-bit BMP "alpha" that is all zero is unused padding
    if out is None:
        out = np.empty((h, w, 3), dtype=np.uint8)
    code = cv2.COLOR_GRAY2RGB if ch <= 2 else cv2.COLOR_BGR2RGB
    rows = max(1, STRIP_PIXELS // w)
    for y in range(0, h, rows):
        part = img[y : y + rows]
        color = part[:, :, : 1 if ch <= 2 else 3]
        if has_alpha:
            color = _composite(color, part[:, :, ch - 1])
        elif color.dtype == np.uint16:
            color = ((color.astype(np.uint32) + 128) // 257).astype(np.uint8)
        cv2.cvtColor(np.ascontiguousarray(color), code, dst=out[y : y + rows])
    return out


def _composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend over ALPHA_BACKGROUND, exactly rounded, producing uint8 (also from 16-bit)."""
    if color.dtype == np.uint8:
        if int(alpha.min()) == 255:
            return np.ascontiguousarray(color)
        a = alpha[:, :, None].astype(np.uint16)
        mix = color.astype(np.uint16) * a + np.uint16(ALPHA_BACKGROUND) * (np.uint16(255) - a)
        return ((mix + np.uint16(127)) // np.uint16(255)).astype(np.uint8)
    a64 = alpha[:, :, None].astype(np.uint64)
    bg16 = np.uint64(ALPHA_BACKGROUND * 257)
    mix64 = color.astype(np.uint64) * a64 + bg16 * (np.uint64(65535) - a64)
    den = np.uint64(65535 * 257)  # odd, so x / den is never exactly .5: floor(x/den + 1/2) is exact
    return ((mix64 + den // np.uint64(2)) // den).astype(np.uint8)


def apply_orientation(img: np.ndarray, orientation: int, out: np.ndarray | None = None) -> np.ndarray:
    """Turn stored pixels into display pixels for an EXIF orientation value (1..8), into
    ``out`` when given (it must have the turned shape).

    Per the EXIF table (row 0 / column 0 of the stored image are the visual ...):
    1 top/left, 2 top/right (mirror), 3 bottom/right (180), 4 bottom/left (flip),
    5 left/top (transpose), 6 right/top (rotate 90 cw), 7 right/bottom (transverse),
    8 left/bottom (rotate 90 ccw). Anything else is ignored.
    """
    turned: np.ndarray
    if orientation == 2:
        turned = cv2.flip(img, 1, dst=out)
    elif orientation == 3:
        turned = cv2.flip(img, -1, dst=out)
    elif orientation == 4:
        turned = cv2.flip(img, 0, dst=out)
    elif orientation == 5:
        turned = cv2.transpose(img, dst=out)
    elif orientation == 6:
        turned = cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE, dst=out)
    elif orientation == 7:
        turned = cv2.flip(cv2.transpose(img), -1, dst=out)
    elif orientation == 8:
        turned = cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE, dst=out)
    elif out is not None:
        np.copyto(out, img)
        turned = out
    else:
        turned = img
    return turned


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
REQUEST_FIXED_BYTES = 16 * 1024 * 1024
"""Per-request bytes that do not grow with the image: strip temporaries (STRIP_PIXELS,
encode.OVERLAY_STRIP_PIXELS), the model input and output tensors, buffers of the codecs."""

_OUTPUT_BYTES_PER_PIXEL = {"json": 0.0, "png": 2.0, "overlay-jpeg": 5.0, "overlay-png": 9.0}
"""Bytes per original-size pixel of rendering the answer, beside the mask: the indexed PNG's
filtered rows + zlib output + the joined body; an overlay's BGR copy for the encoder, the
encoded image and the body (a level-1 PNG of a noisy photo is ~3 bytes a pixel)."""


def request_bytes(header: ImageHeader, *, reduce: int, output: str, upload: int) -> int:
    """Peak bytes one request may need, read from its header before anything is decoded: what
    the memory budget charges (and what tests/test_memory.py holds each request to).

    Decode worker: its copy of the upload, the decoder's own output (16-bit samples 2 bytes,
    alpha a 4th channel, JPEG DCT-scaled by ``reduce``), libjpeg's coefficient buffer for
    multi-scan JPEG, libtiff's strip or tile buffer, libwebp's RGBA buffer, a turned copy for EXIF orientation, and the
    RGB result in shared memory. Daemon: the upload (and a multipart copy), the RGB result
    (the same shared pages, counted again: both processes' peaks show them), the mask at the
    original size and rendering ``output`` ("json", "png", "overlay-jpeg", "overlay-png").
    """
    if output not in _OUTPUT_BYTES_PER_PIXEL:
        raise BadParameter(f"unknown output {output!r}")
    h, w = decoded_hw(header, reduce)
    decoded = h * w
    full = header.pixels
    sample = 2 if header.bit_depth > 8 else 1
    if header.format == "jpeg":
        decoder = decoded * 3 + decoded * 3  # libjpeg's RGB, then copied into the segment
        if header.multiscan:
            decoder += full * header.channels * 2
    else:
        decoder = decoded * (4 if header.has_alpha else 3) * sample
        if header.format == "tiff":
            decoder += header.tile_pixels * max(header.channels, 3) * sample
        elif header.format == "webp":
            decoder += decoded * 4  # libwebp decodes into its own RGBA buffer first
    turned = decoded * 3 if header.orientation != 1 else 0
    worker = 2 * upload + decoder + turned + decoded * 3
    daemon = 2 * upload + decoded * 3 + full * (1 + _OUTPUT_BYTES_PER_PIXEL[output])
    return int(worker + daemon + REQUEST_FIXED_BYTES)
