"""Image bytes -> model input tensor. Pure functions: bytes/arrays in, arrays out, no I/O.

Order of work for one request (see DESIGN.md):

1. :func:`probe_image` reads the container header *without decoding pixels*, so a
   decompression bomb (tiny file declaring 100000x100000 pixels) is refused before any decoder
   allocates memory. It also walks the container structure (markers, chunks, blocks) to find the
   EXIF orientation and to notice truncated uploads.
2. :func:`decode_image` checks the header against the pixel limit, decodes with OpenCV (only
   formats the probe understood ever reach OpenCV), converts to RGB uint8 and applies the EXIF
   orientation itself.
3. :func:`fit_to_input` resizes (stretch, or keep aspect and pad) to the model input size.
4. :func:`input_lut` + :func:`quantize` map pixel bytes to the input tensor with one lookup table.

Policies chosen here (the safest for a long-running daemon):

- Truncated files are refused (:class:`BadImage`), never decoded into a half-grey picture: a
  JPEG needs its EOI marker, a PNG its IEND chunk, a GIF its trailer, a WebP/RIFF its declared
  length, a BMP/TIFF its declared pixel data inside the file.
- Transparent pixels are composited over mid-grey ``ALPHA_BACKGROUND`` = 128, the same value
  used to pad letterboxed input: for the Coral models (mean = std = 128) that is float 0.0, the
  "no information" input, and it does not depend on whatever colour an encoder left hidden
  under alpha = 0. 32-bit BMPs whose alpha bytes are all zero are treated as opaque (that byte
  is commonly unused padding).
- 16-bit samples are scaled to 8 bits with rounding, ``round(v * 255 / 65535)``, not truncated.
- Animated GIF / WebP / APNG: the first frame.
- EXIF orientation is applied here (OpenCV is told to ignore it) for JPEG (APP1), PNG (eXIf),
  WebP (EXIF chunk) and TIFF (IFD0 tag 274). Values outside 1..8 are ignored.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from segd.errors import BadImage, BadParameter, EmptyImage, ImageTooLarge, UnsupportedImage

__all__ = [
    "ALPHA_BACKGROUND",
    "PAD_VALUE",
    "PNG_MAX_METADATA_CHUNKS",
    "DecodedImage",
    "ImageHeader",
    "apply_orientation",
    "check_limits",
    "choose_reduce",
    "decode_image",
    "decoded_hw",
    "fit_to_input",
    "input_lut",
    "normalize_float",
    "probe_image",
    "quantize",
    "quiet_codec_warnings",
    "request_bytes",
]

ALPHA_BACKGROUND = 128
"""Grey that transparent pixels are composited over (= float 0.0 for mean=std=128 models)."""

PAD_VALUE = 128
"""Grey used to pad letterboxed input. Raw-byte models (mean = std = 128, like Coral's DeepLab)
see it as 0.0, the dataset mean; black (0) would be -1.0, a strong dark edge the network never
saw in training. The TF DeepLab reference pipeline pads with the mean pixel (127.5) as well."""

_REDUCE_FLAGS = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}

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

PNG_MAX_METADATA_CHUNKS = 64
"""PNG chunks other than image data (IDAT, and APNG's fcTL/fdAT) a file may have. Real files
have a dozen at most; libpng prints a warning line on stderr for each malformed one, so a 1 MB
upload of 100,000 broken tEXt chunks wrote 100,000 lines into the daemon's log."""


# ----------------------------------------------------------------------------------------------
# Header probing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageHeader:
    """What the container declares, read without decoding pixels.

    ``width``/``height`` are as stored; :attr:`oriented_hw` is the size after EXIF orientation
    (what a viewer shows and what segd reports as the original size).
    """

    format: str  # "jpeg" | "png" | "bmp" | "gif" | "webp" | "tiff"
    width: int
    height: int
    orientation: int = 1  # EXIF orientation 1..8 (1 when absent or invalid)
    bit_depth: int = 8  # bits per sample as stored
    channels: int = 3  # stored samples per pixel incl. alpha (JPEG: components)
    has_alpha: bool = False
    frames: int = 1  # frame count when the container says (GIF, APNG, animated WebP)
    # largest other buffer the decoder sizes from the header (e.g. a TIFF tile)
    buffer_pixels: int = 0
    tile_pixels: int = 0  # TIFF: pixels of one strip or tile (what the decoder reads at a time)
    # JPEG coded as several scans (progressive, or not baseline): libjpeg keeps the whole
    # image's DCT coefficients (2 bytes a sample) while decoding
    multiscan: bool = False
    defect: str | None = None  # why the data looks truncated/incomplete; None when complete

    @property
    def complete(self) -> bool:
        return self.defect is None

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def oriented_hw(self) -> tuple[int, int]:
        """(height, width) after applying the EXIF orientation (5..8 swap the axes)."""
        if self.orientation >= 5:
            return self.width, self.height
        return self.height, self.width


def probe_image(data: bytes) -> ImageHeader:
    """Identify the format and read size, orientation and completeness without decoding.

    Raises :class:`EmptyImage` for no bytes or a zero dimension, :class:`UnsupportedImage` when
    the bytes are not one of the formats segd reads, :class:`BadImage` when a known format's
    header is broken. Never allocates memory proportional to the declared image size.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadParameter(f"image data must be bytes, not {type(data).__name__}")
    if isinstance(data, memoryview):
        data = data.tobytes()
    n = len(data)
    if n == 0:
        raise EmptyImage("the image is empty (0 bytes)")
    if data.startswith(b"\xff\xd8\xff"):
        return _probe_jpeg(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _probe_png(data)
    if data.startswith(b"BM"):
        return _probe_bmp(data)
    if data.startswith((b"GIF87a", b"GIF89a")):
        return _probe_gif(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _probe_webp(data)
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return _probe_tiff(data)
    raise UnsupportedImage(_describe_unsupported(data))


def _describe_unsupported(data: bytes) -> str:
    head = data[:16]
    known = [
        (head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1"), "HEIF/HEIC"),
        (head[4:12] in (b"ftypavif", b"ftypavis"), "AVIF"),
        (head.startswith((b"II+\x00", b"MM\x00+")), "BigTIFF"),
        (
            head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"),
            "JPEG 2000",
        ),
        (head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "), "JPEG XL"),
        (head.startswith(b"%PDF"), "PDF"),
        (head.startswith((b"<svg", b"<?xml")), "SVG/XML"),
        (head.startswith(b"\xff\xd8") and not head.startswith(b"\xff\xd8\xff"), "JPEG-like"),
    ]
    for hit, name in known:
        if hit:
            return f"{name} data is not a supported image format (JPEG, PNG, BMP, GIF, WebP, TIFF)"
    return (
        f"not a supported image format (JPEG, PNG, BMP, GIF, WebP, TIFF); "
        f"first bytes: {head[:8].hex(' ')}"
    )


def _exif_orientation(data: bytes, base: int, end: int) -> int:
    """Orientation tag (0x0112) of IFD0 of an EXIF/TIFF block at data[base:end]; 1 if absent.

    Malformed EXIF is not an error (the pixels are still fine): it just yields 1.
    """
    try:
        ifd = _Ifd.parse(data, base, end, None)
    except (BadImage, struct.error, ValueError):
        return 1
    if ifd is None:
        return 1
    value = ifd.first(0x0112)
    return value if value is not None and 1 <= value <= 8 else 1


_TIFF_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}


class _Ifd:
    """The first IFD of a TIFF structure: tag -> (type, count, absolute value position)."""

    def __init__(self, data: bytes, base: int, end: int, little: bool) -> None:
        self.data = data
        self.base = base
        self.end = end
        self.e = "<" if little else ">"
        self.entries: dict[int, tuple[int, int, int]] = {}

    @classmethod
    def parse(cls, data: bytes, base: int, end: int, fmt: str | None) -> _Ifd | None:
        """Parse the TIFF header at ``base`` and its first IFD. ``fmt`` names the file format
        for error messages when this *is* the image (TIFF); None for embedded EXIF."""
        what = fmt or "EXIF"
        if end - base < 8:
            raise BadImage(f"{what} header is truncated")
        order = data[base : base + 4]
        if order == b"II*\x00":
            little = True
        elif order == b"MM\x00*":
            little = False
        else:
            raise BadImage(f"{what} header has no valid byte-order mark")
        ifd = cls(data, base, end, little)
        (off,) = struct.unpack_from(ifd.e + "I", data, base + 4)
        pos = base + off
        if off < 8 or pos + 2 > end:
            raise BadImage(f"{what} first IFD offset {off} lies outside the data")
        (count,) = struct.unpack_from(ifd.e + "H", data, pos)
        if pos + 2 + 12 * count > end:
            raise BadImage(f"{what} first IFD ({count} entries) runs past the end of the data")
        for i in range(count):
            tag, typ, cnt, _ = struct.unpack_from(ifd.e + "HHII", data, pos + 2 + 12 * i)
            size = _TIFF_TYPE_SIZES.get(typ)
            if size is None or cnt == 0:
                continue
            vpos = pos + 2 + 12 * i + 8
            if size * cnt > 4:
                (voff,) = struct.unpack_from(ifd.e + "I", data, vpos)
                vpos = base + voff
                if voff < 8 or vpos + size * cnt > end:
                    if fmt is None:
                        continue  # unusable EXIF entry: skip it
                    raise BadImage(f"{what} tag {tag} points outside the file")
            ifd.entries.setdefault(tag, (typ, cnt, vpos))
        return ifd

    def ints(self, tag: int) -> np.ndarray | None:
        """Integer values of a BYTE/SHORT/LONG tag (as int64), or None if absent/not integer."""
        entry = self.entries.get(tag)
        if entry is None:
            return None
        typ, cnt, vpos = entry
        dt = {1: "u1", 3: "u2", 4: "u4", 6: "i1", 8: "i2", 9: "i4", 13: "u4"}.get(typ)
        if dt is None:
            return None
        arr = np.frombuffer(self.data, dtype=np.dtype(self.e + dt), count=cnt, offset=vpos)
        return arr.astype(np.int64)

    def first(self, tag: int) -> int | None:
        entry = self.entries.get(tag)
        if entry is None:
            return None
        typ, _, vpos = entry
        fmt = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I"}.get(typ)
        if fmt is None:
            return None
        return int(struct.unpack_from(self.e + fmt, self.data, vpos)[0])


_JPEG_SOF = frozenset(
    [0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF]
)


def _probe_jpeg(data: bytes) -> ImageHeader:
    n = len(data)
    pos = 2
    sof: tuple[int, int, int, int] | None = None  # precision, height, width, components
    orientation = 1
    exif_seen = False
    multiscan = False
    while True:
        if pos >= n:
            if sof is None:
                raise BadImage("JPEG data ends before the frame header (SOF)")
            return _jpeg_header(sof, orientation, multiscan, "JPEG data ends before the scan (SOS)")
        if data[pos] != 0xFF:
            raise BadImage(f"JPEG marker expected at byte {pos}, found 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            continue  # reported as truncation at the top of the loop
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # standalone markers
        if marker in (0xD8, 0xD9):
            raise BadImage(f"JPEG marker 0x{marker:02x} before any image data")
        if pos + 2 > n:
            pos = n
            continue
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise BadImage(f"JPEG segment 0x{marker:02x} has invalid length {length}")
        seg_end = pos + length
        if seg_end > n:
            if sof is None:
                raise BadImage(f"JPEG segment 0x{marker:02x} runs past the end of the data")
            return _jpeg_header(sof, orientation, multiscan, "JPEG data ends inside a header segment")
        if marker in _JPEG_SOF and sof is None:
            if length < 8:
                raise BadImage("JPEG frame header (SOF) is too short")
            precision, height, width, comps = struct.unpack_from(">BHHB", data, pos + 2)
            if comps not in (1, 3, 4):
                raise BadImage(f"JPEG with {comps} colour components is not supported")
            sof = (precision, height, width, comps)
            multiscan = marker not in (0xC0, 0xC1)
        elif marker == 0xE1 and not exif_seen and data.startswith(b"Exif\x00\x00", pos + 2):
            exif_seen = True
            orientation = _exif_orientation(data, pos + 8, seg_end)
        elif marker == 0xDA:
            if sof is None:
                raise BadImage("JPEG scan (SOS) before the frame header (SOF)")
            # Entropy-coded data cannot contain FF D9 (FF is always stuffed), so any FF D9
            # after the scan header is the end of image; none means a truncated upload.
            # rfind: the EOI is normally the last two bytes, found without a scan.
            defect = (
                None
                if data.rfind(b"\xff\xd9", seg_end) != -1
                else "JPEG data has no end-of-image marker (truncated)"
            )
            return _jpeg_header(sof, orientation, multiscan, defect)
        pos = seg_end


def _jpeg_header(
    sof: tuple[int, int, int, int], orientation: int, multiscan: bool, defect: str | None
) -> ImageHeader:
    precision, height, width, comps = sof
    if width == 0 or height == 0:
        raise EmptyImage(f"JPEG declares a zero dimension ({width}x{height})")
    return ImageHeader(
        "jpeg",
        width,
        height,
        orientation=orientation,
        bit_depth=precision,
        channels=comps,
        multiscan=multiscan,
        defect=defect,
    )


_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _probe_png(data: bytes) -> ImageHeader:
    n = len(data)
    if n < 33 or data[12:16] != b"IHDR":
        raise BadImage("PNG does not start with a complete IHDR chunk")
    length, _, width, height, depth, ctype, comp, filt, interlace = struct.unpack_from(
        ">I4sIIBBBBB", data, 8
    )
    if length != 13:
        raise BadImage(f"PNG IHDR has length {length}, expected 13")
    if width == 0 or height == 0:
        raise EmptyImage(f"PNG declares a zero dimension ({width}x{height})")
    if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
        raise BadImage(f"PNG dimensions {width}x{height} exceed the PNG maximum")
    if ctype not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[ctype]:
        raise BadImage(f"PNG colour type {ctype} with bit depth {depth} is invalid")
    if comp != 0 or filt != 0 or interlace not in (0, 1):
        raise BadImage("PNG IHDR has an invalid compression, filter or interlace method")
    orientation = 1
    has_alpha = ctype in (4, 6)
    frames = 1
    seen_idat = False
    seen_exif = False
    metadata = 0
    defect: str | None = "PNG data has no IEND chunk (truncated)"
    pos = 33
    unpack = struct.unpack_from
    while pos + 8 <= n:
        clen, ctag = unpack(">I4s", data, pos)
        if clen > 0x7FFFFFFF:
            raise BadImage(f"PNG chunk at byte {pos} has invalid length {clen}")
        end = pos + 12 + clen
        if end > n:
            defect = f"PNG chunk {ctag!r} runs past the end of the data (truncated)"
            break
        if ctag == b"IEND":
            defect = None if seen_idat else "PNG has no image data (IDAT)"
            break
        if ctag not in (b"IDAT", b"fcTL", b"fdAT"):
            metadata += 1
            if metadata > PNG_MAX_METADATA_CHUNKS:
                raise BadImage(f"PNG has more than {PNG_MAX_METADATA_CHUNKS} metadata chunks")
        if ctag == b"IDAT":
            seen_idat = True
        elif ctag == b"tRNS":
            has_alpha = True
        elif ctag == b"acTL" and clen >= 8:
            frames = max(1, unpack(">I", data, pos + 8)[0])
        elif ctag == b"eXIf" and not seen_exif:
            seen_exif = True
            orientation = _exif_orientation(data, pos + 8, pos + 8 + clen)
        pos = end
    return ImageHeader(
        "png",
        width,
        height,
        orientation=orientation,
        bit_depth=depth,
        channels=_PNG_CHANNELS[ctype] + (1 if has_alpha and ctype in (0, 2, 3) else 0),
        has_alpha=has_alpha,
        frames=frames,
        defect=defect,
    )


def _probe_bmp(data: bytes) -> ImageHeader:
    n = len(data)
    if n < 26:
        raise BadImage("BMP header is truncated")
    (offset, dib) = struct.unpack_from("<II", data, 10)
    if dib == 12:
        width, height, _planes, bpp = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    elif dib in (40, 52, 56, 64, 108, 124):
        if n < 14 + 20:
            raise BadImage("BMP info header is truncated")
        width, height, _planes, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
    else:
        raise BadImage(f"BMP has an unknown info-header size {dib}")
    if width == 0 or height == 0:
        raise EmptyImage(f"BMP declares a zero dimension ({width}x{height})")
    if width < 0:
        raise BadImage(f"BMP declares a negative width {width}")
    height = abs(height)  # negative height = rows stored top-down
    if bpp not in (1, 4, 8, 16, 24, 32):
        raise BadImage(f"BMP has an invalid bit count {bpp}")
    if compression in (4, 5):
        raise UnsupportedImage("BMP with embedded JPEG/PNG data is not supported")
    if compression not in (0, 1, 2, 3, 6):
        raise BadImage(f"BMP has an unknown compression {compression}")
    if offset < 14 + dib or offset > n:
        raise BadImage(f"BMP pixel data offset {offset} is invalid for a {n}-byte file")
    defect = None
    if compression in (0, 3, 6):  # uncompressed: size is known
        stride = ((width * bpp + 31) // 32) * 4
        if offset + stride * height > n:
            defect = (
                f"BMP pixel data needs {stride * height} bytes at offset {offset}, "
                f"the file has {n} (truncated)"
            )
    return ImageHeader(
        "bmp",
        width,
        height,
        bit_depth=bpp,
        channels=4 if bpp == 32 else 3,
        has_alpha=bpp == 32,
        defect=defect,
    )


def _probe_gif(data: bytes) -> ImageHeader:
    n = len(data)
    if n < 13:
        raise BadImage("GIF header is truncated")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    if width == 0 or height == 0:
        raise EmptyImage(f"GIF declares a zero dimension ({width}x{height})")
    pos = 13
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)
    frames = 0
    has_alpha = False
    defect: str | None = "GIF data has no trailer (truncated)"

    def skip_sub_blocks(p: int) -> int:
        while p < n:
            size = data[p]
            p += 1 + size
            if size == 0:
                return p
        return -1

    while pos < n:
        block = data[pos]
        if block == 0x3B:
            defect = None if frames else "GIF has no image"
            break
        if block == 0x21:
            if pos + 2 > n:
                break
            if data[pos + 1] == 0xF9 and pos + 4 <= n and data[pos + 2] == 4 and data[pos + 3] & 1:
                has_alpha = True
            pos = skip_sub_blocks(pos + 2)
        elif block == 0x2C:
            if pos + 11 > n:
                break
            left, top, fw, fh, fflags = struct.unpack_from("<HHHHB", data, pos + 1)
            if fw == 0 or fh == 0 or left + fw > width or top + fh > height:
                raise BadImage(
                    f"GIF frame {frames + 1} ({fw}x{fh} at {left},{top}) lies outside the "
                    f"{width}x{height} screen"
                )
            frames += 1
            pos += 10
            if fflags & 0x80:
                pos += 3 << ((fflags & 7) + 1)
            pos = skip_sub_blocks(pos + 1)  # +1: LZW minimum code size
        else:
            raise BadImage(f"GIF has an unknown block 0x{block:02x} at byte {pos}")
        if pos < 0:
            break
    return ImageHeader(
        "gif",
        width,
        height,
        bit_depth=8,
        channels=4 if has_alpha else 3,
        has_alpha=has_alpha,
        frames=max(frames, 1),
        defect=defect,
    )


def _probe_webp(data: bytes) -> ImageHeader:
    n = len(data)
    (riff_size,) = struct.unpack_from("<I", data, 4)
    end = 8 + riff_size
    defect = None
    if end > n:
        defect = f"WebP RIFF declares {end} bytes, the data has {n} (truncated)"
        end = n
    if end < 20:
        raise BadImage("WebP header is truncated")
    fourcc, size = struct.unpack_from("<4sI", data, 12)
    payload = 20
    orientation = 1
    frames = 1
    if payload + size > end and defect is None:
        defect = f"WebP chunk {fourcc!r} runs past the end of the data (truncated)"
    if fourcc == b"VP8 ":
        if payload + 10 > end:
            raise BadImage("WebP VP8 header is truncated")
        tag = data[payload]
        if tag & 1 or data[payload + 3 : payload + 6] != b"\x9d\x01\x2a":
            raise BadImage("WebP VP8 data does not start with a key frame")
        w, h = struct.unpack_from("<HH", data, payload + 6)
        width, height, has_alpha = w & 0x3FFF, h & 0x3FFF, False
    elif fourcc == b"VP8L":
        if payload + 5 > end or data[payload] != 0x2F:
            raise BadImage("WebP lossless header is invalid")
        (bits,) = struct.unpack_from("<I", data, payload + 1)
        if bits >> 29:
            raise BadImage(f"WebP lossless version {bits >> 29} is unknown")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        has_alpha = bool((bits >> 28) & 1)
    elif fourcc == b"VP8X":
        if size < 10 or payload + 10 > end:
            raise BadImage("WebP extended header is truncated")
        flags = data[payload]
        width = int.from_bytes(data[payload + 4 : payload + 7], "little") + 1
        height = int.from_bytes(data[payload + 7 : payload + 10], "little") + 1
        has_alpha = bool(flags & 0x10)
        anmf = 0
        pos = 12
        while pos + 8 <= end:
            cc, csize = struct.unpack_from("<4sI", data, pos)
            nxt = pos + 8 + csize + (csize & 1)
            if pos + 8 + csize > end:
                defect = defect or f"WebP chunk {cc!r} runs past the end of the data (truncated)"
                break
            if cc == b"EXIF" and orientation == 1:
                base = pos + 8
                if data.startswith(b"Exif\x00\x00", base):
                    base += 6
                orientation = _exif_orientation(data, base, pos + 8 + csize)
            elif cc == b"ANMF" and csize >= 16:
                anmf += 1
                fx, fy, fw, fh = (
                    int.from_bytes(data[pos + 8 + k : pos + 11 + k], "little") for k in (0, 3, 6, 9)
                )
                if 2 * fx + fw + 1 > width or 2 * fy + fh + 1 > height:
                    raise BadImage(f"WebP animation frame {anmf} lies outside the canvas")
            pos = nxt
        frames = max(1, anmf)
    else:
        raise BadImage(f"WebP has an unknown first chunk {fourcc!r}")
    if width == 0 or height == 0:
        raise EmptyImage(f"WebP declares a zero dimension ({width}x{height})")
    return ImageHeader(
        "webp",
        width,
        height,
        orientation=orientation,
        channels=4 if has_alpha else 3,
        has_alpha=has_alpha,
        frames=frames,
        defect=defect,
    )


def _probe_tiff(data: bytes) -> ImageHeader:
    n = len(data)
    ifd = _Ifd.parse(data, 0, n, "TIFF")
    assert ifd is not None
    width = ifd.first(256)
    height = ifd.first(257)
    if width is None or height is None:
        raise BadImage("TIFF first IFD has no ImageWidth/ImageLength tags")
    if width <= 0 or height <= 0:
        raise EmptyImage(f"TIFF declares a zero dimension ({width}x{height})")
    spp = ifd.first(277) or 1
    bps = ifd.ints(258)
    bit_depth = int(bps.max()) if bps is not None and bps.size else 1
    extra = ifd.ints(338)
    orientation = ifd.first(274) or 1
    if not 1 <= orientation <= 8:
        orientation = 1
    tile_w, tile_h = ifd.first(322), ifd.first(323)
    if tile_w is not None and tile_h is not None:
        tile_pixels = tile_w * tile_h
        offsets, counts = ifd.ints(324), ifd.ints(325)
    else:
        rows = ifd.first(278)
        tile_pixels = width * (height if rows is None else min(max(rows, 1), height))
        offsets, counts = ifd.ints(273), ifd.ints(279)
    buffer_pixels = max(width * height, tile_pixels)
    defect = None
    if offsets is None:
        raise BadImage("TIFF first IFD has no strip or tile offsets")
    if counts is not None and counts.size == offsets.size and offsets.size:
        last = int((offsets + counts).max())
        if last > n:
            defect = f"TIFF image data reaches byte {last}, the file has {n} (truncated)"
    elif offsets.size and int(offsets.max()) >= n:
        defect = "TIFF image data lies past the end of the file (truncated)"
    return ImageHeader(
        "tiff",
        width,
        height,
        orientation=orientation,
        bit_depth=bit_depth,
        channels=spp,
        has_alpha=spp in (2, 4) or (extra is not None and extra.size > 0),
        buffer_pixels=buffer_pixels,
        tile_pixels=tile_pixels,
        defect=defect,
    )


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
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
        raw = os.environ.get(key)
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


def _imdecode_rgb(buf: np.ndarray) -> np.ndarray | None:
    """Full-size JPEG decode to RGB; OpenCV < 4.11 has no IMREAD_COLOR_RGB (decode BGR + swap)."""
    flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    if flag is not None:
        out: np.ndarray | None = cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)
        return out
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


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
    if out is not None and (out.dtype != np.uint8 or out.shape != (*decoded_hw(header, reduce), 3)):
        raise BadParameter(f"out must be a {decoded_hw(header, reduce)} x 3 uint8 array")
    buf = np.frombuffer(data, dtype=np.uint8)
    fmt = header.format.upper()
    r = reduce if header.format == "jpeg" else 1
    try:
        if header.format == "jpeg":
            if r == 1:
                img = _imdecode_rgb(buf)
            else:
                img = cv2.imdecode(buf, _REDUCE_FLAGS[r] | cv2.IMREAD_IGNORE_ORIENTATION)
                if img is not None:
                    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        else:
            if header.format == "tiff":
                buf = _tiff_without_orientation(data, buf)
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
    if header.orientation != 1:
        rgb = apply_orientation(rgb, header.orientation, out)
    elif out is not None and rgb is not out:
        np.copyto(out, rgb)
        rgb = out
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


def _tiff_without_orientation(data: bytes, buf: np.ndarray) -> np.ndarray:
    """OpenCV's TIFF reader applies the Orientation tag itself, whatever the flags say. To keep
    one code path (orientation applied once, here, for every format) hand it a copy with the
    tag value set to 1 (top-left)."""
    ifd = _Ifd.parse(data, 0, len(data), "TIFF")
    entry = ifd.entries.get(0x0112) if ifd is not None else None
    if entry is None or ifd is None:
        return buf
    typ, _, vpos = entry
    code = {3: "H", 4: "I", 8: "h", 9: "i"}.get(typ)
    if code is None:
        return buf
    if struct.unpack_from(ifd.e + code, data, vpos)[0] == 1:
        return buf
    patched = bytearray(data)
    struct.pack_into(ifd.e + code, patched, vpos, 1)
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
# Resizing to the model input
# ----------------------------------------------------------------------------------------------
def _check_rgb(rgb: np.ndarray, name: str = "rgb") -> None:
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.dtype != np.uint8
        or rgb.ndim != 3
        or rgb.shape[2] != 3
    ):
        raise BadParameter(f"{name} must be an H x W x 3 uint8 array")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadParameter(f"{name} has a zero dimension {rgb.shape[:2]}")


def _resize(rgb: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """INTER_AREA where shrinking (averages, no aliasing), INTER_LINEAR where enlarging; an
    image that shrinks on one axis and grows on the other is resized one axis at a time."""
    h, w = rgb.shape[:2]
    if (h, w) == (out_h, out_w):
        return rgb
    if out_h <= h and out_w <= w:
        return cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)
    if out_h >= h and out_w >= w:
        return cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    if out_h < h:  # shrink rows first (less data), then widen
        tmp = cv2.resize(rgb, (w, out_h), interpolation=cv2.INTER_AREA)
        return cv2.resize(tmp, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    tmp = cv2.resize(rgb, (out_w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(tmp, (out_w, out_h), interpolation=cv2.INTER_LINEAR)


def fit_to_input(
    rgb: np.ndarray, input_hw: tuple[int, int], keep_aspect: bool
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize RGB uint8 to the model input size.

    Returns ``(image, (top, left, height, width))`` where the box is the region of the input
    holding image content. ``keep_aspect=False`` stretches to the full input (box = the whole
    input). ``keep_aspect=True`` scales to fit and places the image at the TOP-LEFT corner,
    padding right/bottom with :data:`PAD_VALUE`: this is how the TF DeepLab reference pipeline
    (pad_to_bounding_box at offset 0,0) and pycoral's ``set_resized_input`` lay out the input,
    and it makes mapping the output back a plain crop. An image already at the input size is
    returned as is (same object, no copy).
    """
    _check_rgb(rgb)
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    if in_h < 1 or in_w < 1:
        raise BadParameter(f"input size must be positive, not {input_hw}")
    h, w = rgb.shape[:2]
    if (h, w) == (in_h, in_w):
        return rgb, (0, 0, in_h, in_w)
    if not keep_aspect:
        return np.ascontiguousarray(_resize(rgb, in_h, in_w)), (0, 0, in_h, in_w)
    scale = min(in_h / h, in_w / w)
    new_h = min(in_h, max(1, round(h * scale)))
    new_w = min(in_w, max(1, round(w * scale)))
    resized = _resize(rgb, new_h, new_w)
    if (new_h, new_w) == (in_h, in_w):
        return np.ascontiguousarray(resized), (0, 0, in_h, in_w)
    out = np.full((in_h, in_w, 3), PAD_VALUE, dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out, (0, 0, new_h, new_w)


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------
def _round_half_away(x: np.ndarray) -> np.ndarray:
    """std::round (TFLite's TfLiteRound): halves go away from zero (np.round would go to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def input_lut(
    mean: tuple[float, float, float] | np.ndarray,
    std: tuple[float, float, float] | np.ndarray,
    scale: float,
    zero_point: int,
    dtype: np.dtype | type | str,
) -> np.ndarray | None:
    """Per-channel table pixel byte -> input tensor value, shape (3, 256), or None for identity.

    The network expects ``f = (p - mean) / std``; a quantized input tensor holds
    ``q = clip(round(f / scale) + zero_point)`` with round = half away from zero, which is what
    TFLite's QUANTIZE op does (``TfLiteRound`` = ``std::round``). Computed in float64.
    For a float32 tensor the table holds ``f`` itself (scale/zero_point are ignored) and is
    never None. For uint8 tensors where ``q == p`` for every byte (Coral's models: mean = std =
    128, scale = 1/128, zero_point = 128) None is returned so :func:`quantize` can skip work.
    """
    dt = np.dtype(dtype)
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    s = np.asarray(std, dtype=np.float64).reshape(-1)
    if m.size == 1:
        m = np.repeat(m, 3)
    if s.size == 1:
        s = np.repeat(s, 3)
    if m.shape != (3,) or s.shape != (3,):
        raise BadParameter(f"mean and std need 3 values (RGB), got {m.size} and {s.size}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(s != 0)):
        raise BadParameter(f"invalid normalization mean={m.tolist()} std={s.tolist()}")
    p = np.arange(256, dtype=np.float64)[None, :]
    f = (p - m[:, None]) / s[:, None]
    if dt == np.float32:
        return np.ascontiguousarray(f.astype(np.float32))
    if dt not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int16)):
        raise BadParameter(f"unsupported input tensor dtype {dt}")
    if not (math.isfinite(scale) and scale > 0):
        raise BadParameter(f"input quantization scale must be positive, not {scale}")
    info = np.iinfo(dt)
    q = np.clip(_round_half_away(f / float(scale)) + int(zero_point), info.min, info.max)
    lut = np.ascontiguousarray(q.astype(dt))
    if dt == np.uint8 and np.array_equal(
        lut, np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    ):
        return None
    return lut


def quantize(rgb: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """Apply an :func:`input_lut` table: H x W x 3 uint8 -> H x W x 3 of the table's dtype.

    ``lut=None`` (identity) returns ``rgb`` itself, no copy. One cv2.LUT pass per image; int8
    tables are applied as their uint8 bit patterns and the result reinterpreted (a view).
    """
    _check_rgb(rgb)
    if lut is None:
        return rgb
    if lut.shape != (3, 256):
        raise BadParameter(f"lookup table must have shape (3, 256), not {lut.shape}")
    table = np.ascontiguousarray(lut.T).reshape(1, 256, 3)
    if table.dtype == np.int8:
        return cv2.LUT(rgb, table.view(np.uint8)).view(np.int8)
    if table.dtype in (np.uint8, np.float32, np.int16, np.uint16):
        return cv2.LUT(rgb, table)
    # Other dtypes: numpy gather per channel.
    out = np.empty(rgb.shape, dtype=lut.dtype)
    for c in range(3):
        out[:, :, c] = lut[c][rgb[:, :, c]]
    return out


def normalize_float(
    rgb: np.ndarray,
    mean: tuple[float, float, float] | np.ndarray,
    std: tuple[float, float, float] | np.ndarray,
) -> np.ndarray:
    """(p - mean) / std as float32 H x W x 3, for non-quantized (float input) models."""
    lut = input_lut(mean, std, 1.0, 0, np.float32)
    assert lut is not None
    return quantize(rgb, lut)


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
