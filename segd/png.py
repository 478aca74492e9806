"""PNG chunks, read and written: the one place segd handles PNG's container (signature, chunk
length/type/CRC). Used to write indexed mask PNGs (:mod:`segd.encode`) and to read a palette
PNG's indices exactly (:mod:`segd.dataset`)."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Chunks that carry the image itself; everything else is ancillary.
CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")


def chunk(kind: bytes, payload: bytes) -> bytes:
    """One chunk: length, type, payload, CRC-32 of type + payload."""
    crc = zlib.crc32(payload, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def read_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk up to IEND; ValueError for a truncated file."""
    chunks, pos = [], len(SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            raise ValueError(f"PNG chunk {kind!r} runs past the end of the file (truncated)")
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
        if kind == b"IEND":
            return chunks
    raise ValueError("PNG has no IEND chunk (truncated)")
