"""What every source kind is: a blocking reader of encoded frames (JPEG bytes) from one
configured camera, run on its own thread. Reconnecting, rate and frame dropping are the
runner's job (``segd.sources.runner``), not the reader's."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import BinaryIO

from segd.settings import SourceSettings


class SourceError(Exception):
    """The camera cannot be read right now (refused, timed out, ended, sent garbage): the
    runner reconnects with backoff."""


class FrameReader(abc.ABC):
    """One connection to a camera. ``frames()`` connects and yields whole encoded images until
    the stream fails (raises :class:`SourceError`) or :meth:`close` is called from another
    thread (then it returns)."""

    def __init__(self, settings: SourceSettings, max_frame_bytes: int) -> None:
        self.settings = settings
        self.max_frame_bytes = max_frame_bytes
        self.closed = False

    @abc.abstractmethod
    def frames(self) -> Iterator[bytes]: ...

    def close(self) -> None:
        """Interrupt :meth:`frames` (called from another thread)."""
        self.closed = True


def read_multipart(stream: BinaryIO, max_frame_bytes: int) -> Iterator[bytes]:
    """The parts of a ``multipart/x-mixed-replace`` body (an MJPEG stream: what IP cameras and
    ffmpeg's mpjpeg muxer send). A part with ``Content-Length`` is read exactly; one without is
    read up to the next JPEG end marker. Parts over ``max_frame_bytes`` are an error, so a
    broken camera cannot make the daemon buffer without bound."""
    while True:
        line = stream.readline(1024)
        if not line:
            return
        if not line.strip():
            continue
        if not line.startswith(b"--"):
            raise SourceError(f"not an MJPEG stream (expected a multipart boundary, got {line[:40]!r})")
        length: int | None = None
        for _ in range(64):
            header = stream.readline(1024)
            if not header:
                return
            if not header.strip():
                break
            key, _, value = header.decode("latin-1").partition(":")
            if key.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise SourceError(f"bad Content-Length {value.strip()!r} in the MJPEG stream") from None
        else:
            raise SourceError("an MJPEG part has more than 64 header lines")
        if length is not None:
            if not 0 < length <= max_frame_bytes:
                raise SourceError(f"an MJPEG frame of {length} bytes (limit {max_frame_bytes})")
            data = _read_exactly(stream, length)
        else:
            data = _read_jpeg(stream, max_frame_bytes)
        if data is None:
            return
        yield data


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    chunks = []
    while n > 0:
        chunk = stream.read(min(n, 1 << 16))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_jpeg(stream: BinaryIO, max_frame_bytes: int) -> bytes | None:
    """A JPEG without a declared length: up to its end-of-image marker."""
    buf = bytearray()
    while True:
        chunk = stream.readline(1 << 16)  # lines are arbitrary in JPEG data; bounded reads
        if not chunk:
            return None
        buf += chunk
        end = buf.find(b"\xff\xd9")
        if end >= 0:
            return bytes(buf[: end + 2])
        if len(buf) > max_frame_bytes:
            raise SourceError(f"an MJPEG frame over {max_frame_bytes} bytes without an end marker")
