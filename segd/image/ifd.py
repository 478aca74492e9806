"""The first IFD of a TIFF structure: TIFF files themselves and the EXIF blocks of JPEG, PNG
and WebP (where the orientation tag lives). Read-only, bounds-checked, no allocation
proportional to what the file declares."""

from __future__ import annotations

import struct

import numpy as np

from segd.errors import BadImage

__all__ = ["Ifd", "exif_orientation"]


def exif_orientation(data: bytes, base: int, end: int) -> int:
    """Orientation tag (0x0112) of IFD0 of an EXIF/TIFF block at data[base:end]; 1 if absent.

    Malformed EXIF is not an error (the pixels are still fine): it just yields 1.
    """
    try:
        ifd = Ifd.parse(data, base, end, None)
    except (BadImage, struct.error, ValueError):
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


_INT_CODES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I"}
"""Integer TIFF types (BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG, IFD) as struct / numpy codes."""


class Ifd:
    """The first IFD of a TIFF structure: tag -> (type, count, absolute value position)."""

    def __init__(self, data: bytes, little: bool) -> None:
        self.data = data
        self.e = "<" if little else ">"
        self.entries: dict[int, tuple[int, int, int]] = {}

    @classmethod
    def parse(cls, data: bytes, base: int, end: int, fmt: str | None) -> Ifd:
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
        ifd = cls(data, little)
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

    def _int_entry(self, tag: int) -> tuple[str, int, int] | None:
        """(struct code with byte order, count, value position) of an integer tag, or None if
        the tag is absent or not of an integer type."""
        entry = self.entries.get(tag)
        if entry is None or entry[0] not in _INT_CODES:
            return None
        typ, cnt, vpos = entry
        return self.e + _INT_CODES[typ], cnt, vpos

    def ints(self, tag: int) -> np.ndarray | None:
        """Integer values of a BYTE/SHORT/LONG tag (as int64), or None if absent/not integer."""
        found = self._int_entry(tag)
        if found is None:
            return None
        code, cnt, vpos = found
        return np.frombuffer(self.data, dtype=np.dtype(code), count=cnt, offset=vpos).astype(np.int64)

    def position(self, tag: int) -> tuple[int, str] | None:
        """(offset, struct format with byte order) of a SHORT/LONG tag's first value."""
        found = self._int_entry(tag)
        if found is None or self.entries[tag][0] not in (3, 4, 8, 9):
            return None
        return found[2], found[0]

    def first(self, tag: int) -> int | None:
        found = self._int_entry(tag)
        if found is None:
            return None
        return int(struct.unpack_from(found[0], self.data, found[2])[0])
