"""Container headers, read without decoding pixels: :func:`probe_image`.

A decompression bomb (a tiny file declaring 100000x100000 pixels) must be refused before any
decoder allocates memory, and a truncated upload before it is decoded into a half-grey picture.
So each format's structure (JPEG markers, PNG chunks, BMP/GIF/WebP/TIFF headers and blocks) is
walked here to read the size, bit depth, channels, alpha, frame count, EXIF orientation and
whether the data is complete. A request's header is probed once and passed down to the memory
budget, the limits and the decoder.

Refused as truncated (:class:`BadImage`): a JPEG without its EOI marker, a PNG without its IEND
chunk, a GIF without its trailer, a WebP/RIFF shorter than declared, a BMP/TIFF whose declared
pixel data lies outside the file. EXIF orientation is read for JPEG (APP1), PNG (eXIf), WebP
(EXIF chunk) and TIFF (IFD0 tag 274); values outside 1..8 are ignored.

Why not Pillow's lazy ``Image.open``: it reads sizes without decoding too, but it does not say
whether the data is complete, does not count PNG metadata chunks or check animation frames
against the canvas, and would identify formats segd hands to OpenCV — the probe must agree
with OpenCV's decoders, which are what runs.

One module (~520 lines) on purpose: one small walker per container format behind one entry point,
sharing the limits and the truncation rules.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from segd.errors import BadImage, BadParameter, EmptyImage, UnsupportedImage
from segd.image.ifd import Ifd, exif_orientation

__all__ = ["PNG_MAX_METADATA_CHUNKS", "ImageHeader", "probe_image"]

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
    # TIFF: where IFD0's Orientation value is stored (offset, struct format with byte order),
    # so the decoder can neutralise it without parsing the IFD again
    tiff_orientation_at: tuple[int, str] | None = None
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


def _require_size(fmt: str, width: int, height: int) -> None:
    if width == 0 or height == 0:
        raise EmptyImage(f"{fmt} declares a zero dimension ({width}x{height})")


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
            orientation = exif_orientation(data, pos + 8, seg_end)
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
    _require_size("JPEG", width, height)
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
    _require_size("PNG", width, height)
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
            orientation = exif_orientation(data, pos + 8, pos + 8 + clen)
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
    _require_size("BMP", width, height)
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
    _require_size("GIF", width, height)
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
                orientation = exif_orientation(data, base, pos + 8 + csize)
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
    _require_size("WebP", width, height)
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
    ifd = Ifd.parse(data, 0, n, "TIFF")
    width = ifd.first(256)
    height = ifd.first(257)
    if width is None or height is None:
        raise BadImage("TIFF first IFD has no ImageWidth/ImageLength tags")
    if width <= 0 or height <= 0:  # TIFF sizes may come from signed fields
        raise EmptyImage(f"TIFF declares a zero dimension ({width}x{height})")
    spp = ifd.first(277) or 1
    bps = ifd.ints(258)
    bit_depth = int(bps.max()) if bps is not None and bps.size else 1
    extra = ifd.ints(338)
    orientation = ifd.first(274) or 1
    if not 1 <= orientation <= 8:
        orientation = 1
    orientation_at = ifd.position(274)
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
        tiff_orientation_at=orientation_at,
        defect=defect,
    )
