"""Cameras that only serve a still image (``/snapshot.jpg``): polled at the source's rate."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator

from segd.settings import SourceSettings
from segd.sources.base import FrameReader, SourceError
from segd.sources.http import open_url


class SnapshotReader(FrameReader):
    def __init__(self, settings: SourceSettings, max_frame_bytes: int) -> None:
        super().__init__(settings, max_frame_bytes)
        self._stop = threading.Event()

    def frames(self) -> Iterator[bytes]:
        period = 1.0 / self.settings.fps
        while not self._stop.is_set():
            response, _ = open_url(self.settings.url, self.settings.timeout)
            try:
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_frame_bytes:
                    raise SourceError(f"a snapshot of {declared} bytes (limit {self.max_frame_bytes})")
                data = response.read(self.max_frame_bytes + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise SourceError(f"snapshot read failed: {exc or type(exc).__name__}") from exc
            finally:
                response.close()
            if len(data) > self.max_frame_bytes:
                raise SourceError(f"a snapshot over {self.max_frame_bytes} bytes")
            if not data:
                raise SourceError("the camera sent an empty snapshot")
            yield data
            self._stop.wait(period)

    def close(self) -> None:
        super().close()
        self._stop.set()
