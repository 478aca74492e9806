"""HTTP MJPEG cameras (``multipart/x-mixed-replace``): the frames are passed on as sent, no
re-encoding."""

from __future__ import annotations

import contextlib
import http.client
import socket
from collections.abc import Iterator

from segd.settings import SourceSettings
from segd.sources.base import FrameReader, SourceError, read_multipart
from segd.sources.http import open_url


class MjpegReader(FrameReader):
    def __init__(self, settings: SourceSettings, max_frame_bytes: int) -> None:
        super().__init__(settings, max_frame_bytes)
        self._socket: socket.socket | None = None

    def frames(self) -> Iterator[bytes]:
        response, self._socket = open_url(self.settings.url, self.settings.timeout)
        if self.closed:
            response.close()
            return
        try:
            ctype = response.headers.get("content-type", "")
            if "multipart" not in ctype.lower():
                raise SourceError(f"{self.settings.name}: expected an MJPEG (multipart) stream, got {ctype or 'no content type'}")
            yield from read_multipart(response, self.max_frame_bytes)
            if not self.closed:
                raise SourceError("the camera ended the stream")
        except (OSError, http.client.HTTPException) as exc:
            if not self.closed:
                raise SourceError(f"stream read failed: {exc or type(exc).__name__}") from exc
        finally:
            response.close()

    def close(self) -> None:
        super().close()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):  # unblocks a read waiting on the socket
                sock.shutdown(socket.SHUT_RDWR)
