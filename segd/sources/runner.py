"""Run the configured cameras: each has a reader thread (connect, read, reconnect with backoff)
and a segmenting task on the event loop. The reader hands over every frame; only the newest
waits, so a camera faster than segmentation costs one frame of memory, not a queue. Frames go
through :meth:`ModelService.segment` like ``POST /segment`` (same admission, same masks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from segd import encode
from segd.errors import ConfigError, ModelNotReady, NoFrameYet, Overloaded, SegdError, UnknownSource
from segd.settings import Settings, SourceSettings
from segd.sources import open_reader
from segd.sources.base import FrameReader, SourceError
from segd.sources.http import redact

if TYPE_CHECKING:  # the service is passed in: segd.app depends on segd.sources, not the reverse
    from segd.app.service import ModelService

log = logging.getLogger("segd.sources")


@dataclass
class Frame:
    """The last segmented frame of a camera, and its renderings (made once, on demand)."""

    seq: int
    time: float  # unix time it was segmented
    data: bytes  # the camera's encoded frame, as received
    mask: np.ndarray  # class ids at the frame's size
    rgb: np.ndarray  # the decoded frame (JPEG DCT-scaled when large: what was decoded)
    document: dict[str, Any]  # the JSON summary, as POST /segment?format=json
    palette: np.ndarray
    background: int | None  # the class left untinted in the overlay
    _cache: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self, kind: str) -> bytes:
        """``png`` (indexed mask, as POST /segment) or ``overlay`` (JPEG of the class colours
        over the frame); thread-safe, each made once per frame."""
        with self._lock:
            if kind not in self._cache:
                mask = self.mask
                h, w = self.rgb.shape[:2]
                if kind == "overlay" and mask.shape != (h, w):  # a large frame was decoded DCT-scaled
                    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
                self._cache[kind], _ = encode.render(kind, mask, self.palette, self.rgb, "jpeg", self.background)
            return self._cache[kind]


Listener = Callable[["Source", Frame], None]


class Source:
    """One configured camera: its reader thread, its segmenting task and its state."""

    def __init__(self, settings: SourceSettings, service: ModelService, max_frame_bytes: int) -> None:
        self.settings = settings
        self.name = settings.name
        self.service = service
        self.model = service.slot(settings.model).name  # an unknown model stops the start-up
        labels = service.slot(self.model).variant.labels.names
        unknown = [label for label in settings.thresholds if label not in labels]
        if unknown:
            raise ConfigError(f"sources.{self.name}.thresholds: {', '.join(unknown)} not among the classes of {self.model}: {', '.join(labels)}")
        self.max_frame_bytes = max_frame_bytes
        self.state = "stopped"  # connecting | streaming | reconnecting | stopped
        self.error: str | None = None
        self.received = 0  # frames read from the camera
        self.segmented = 0
        self.dropped = 0  # read but not segmented (a newer frame came first, or the queue was full)
        self.failed = 0  # frames the pipeline refused (e.g. a corrupt JPEG)
        self.reconnects = 0
        self.latest: Frame | None = None
        self.listeners: list[Listener] = []
        self._pending: bytes | None = None  # the newest frame not yet taken (at most one)
        self._slot = threading.Lock()  # guards _pending, the counters it changes, _wake_scheduled
        self._wake_scheduled = False
        self._reader: FrameReader | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived = asyncio.Event()
        self._new_frame = asyncio.Event()

    # --- life ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._read_loop, name=f"source-{self.name}", daemon=True)
        self._thread.start()
        self._task = self._loop.create_task(self._segment_loop())

    async def stop(self) -> None:
        self._stop.set()
        reader = self._reader
        if reader is not None:
            reader.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self.state = "stopped"
        self._wake_waiters()

    # --- reading (thread) ------------------------------------------------------------------
    def _read_loop(self) -> None:
        s = self.settings
        backoff = s.reconnect_base
        while not self._stop.is_set():
            self.state = "connecting" if self.received == 0 else "reconnecting"
            reader = open_reader(s, self.max_frame_bytes)
            self._reader = reader
            streaming = False
            try:
                for data in reader.frames():
                    if self._stop.is_set():
                        break
                    if not streaming:
                        streaming, backoff = True, s.reconnect_base
                        self.state, self.error = "streaming", None
                        log.info("%s: streaming from %s", self.name, redact(s.url))
                    self._hand_over(data)
                else:
                    if not self._stop.is_set() and not reader.closed:
                        raise SourceError("the stream ended")
            except SourceError as exc:
                self.error = str(exc)
            except Exception as exc:  # a reader bug must not end the camera for good
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: reader failed", self.name)
            finally:
                reader.close()
                self._reader = None
            if self._stop.is_set():
                break
            if reader.closed and self.error is None:
                self.error = f"no frame for {self._stall_limit():g} s"
            self.reconnects += 1
            self.state = "reconnecting"
            log.warning("%s: %s; reconnecting in %g s", self.name, self.error, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, s.reconnect_max)

    def _hand_over(self, data: bytes) -> None:
        """From the reader thread: the newest frame replaces one still waiting (dropped). The
        frame is stored here, not in a callback, so a busy event loop never queues frames; at
        most one wake-up is scheduled at a time."""
        with self._slot:
            self.received += 1
            if self._pending is not None:
                self.dropped += 1
            self._pending = data
            wake, self._wake_scheduled = not self._wake_scheduled, True
        loop = self._loop
        if wake and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._slot:
            self._wake_scheduled = False
        self._arrived.set()

    def _take(self) -> bytes | None:
        with self._slot:
            data, self._pending = self._pending, None
        self._arrived.clear()
        return data

    def _stall_limit(self) -> float:
        return self.settings.timeout + 1.0 / self.settings.fps

    # --- segmenting (event loop) -----------------------------------------------------------
    async def _segment_loop(self) -> None:
        period = 1.0 / self.settings.fps
        next_at = 0.0
        while True:
            try:
                await asyncio.wait_for(self._arrived.wait(), self._stall_limit())
            except TimeoutError:
                reader = self._reader
                if self.state == "streaming" and reader is not None:
                    reader.close()  # a camera that went silent: the reader thread reconnects
                continue
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # frames arriving meanwhile replace the waiting one
            data = self._take()
            if data is None:
                continue
            next_at = time.monotonic() + period
            await self._segment(data)

    async def _segment(self, data: bytes) -> None:
        try:
            result = await self.service.segment(self.model, data, fmt="json", keep_aspect=self.settings.keep_aspect)
        except (Overloaded, ModelNotReady) as exc:
            with self._slot:
                self.dropped += 1
            self.error = exc.detail
            return
        except SegdError as exc:
            self.failed += 1
            self.error = exc.detail
            return
        seg = result.segmentation
        assert seg is not None
        doc = dict(result.document)  # timings_ms included (the service sets them once the total is known)
        doc.update(source=self.name, frame=self.segmented + 1, time=round(time.time(), 3))
        labels = self.service.slot(self.model).variant.labels
        frame = Frame(self.segmented + 1, doc["time"], data, seg.mask, seg.image.rgb, doc, labels.palette, labels.background)
        self.latest = frame
        self.segmented += 1
        if self.state == "streaming":
            self.error = None
        self._wake_waiters()
        for listener in list(self.listeners):
            try:
                listener(self, frame)
            except Exception:  # a publisher's bug must not stop segmentation
                log.exception("%s: frame listener failed", self.name)

    def _wake_waiters(self) -> None:
        event, self._new_frame = self._new_frame, asyncio.Event()
        event.set()

    async def next_frame(self, after: int, timeout: float) -> Frame | None:
        """The first frame newer than ``after`` (a seq), waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.latest
            if frame is not None and frame.seq > after:
                return frame
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_frame.wait(), left)

    async def render(self, frame: Frame, kind: str) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self.service.cpu_pool, frame.render, kind)

    # --- state -----------------------------------------------------------------------------
    def frame_age(self) -> float | None:
        return round(time.time() - self.latest.time, 3) if self.latest else None

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name,
            "kind": s.kind,
            "url": redact(s.url),
            "model": self.model,
            "fps": s.fps,
            "state": self.state,
            "error": self.error,
            "frames": {
                "received": self.received, "segmented": self.segmented,
                "dropped": self.dropped, "failed": self.failed,
            },
            "reconnects": self.reconnects,
            "last_frame_age_s": self.frame_age(),
            "latest": self.latest.document if self.latest else None,
        }


class SourceManager:
    """All configured cameras."""

    def __init__(self, settings: Settings, service: ModelService) -> None:
        self.sources = {
            name: Source(src, service, settings.max_upload_bytes) for name, src in settings.sources.items()
        }
        self.closing = False

    def get(self, name: str) -> Source:
        source = self.sources.get(name)
        if source is None:
            known = ", ".join(self.sources) or "none configured"
            raise UnknownSource(f"no source named {name!r} (configured: {known})")
        return source

    def latest(self, name: str) -> Frame:
        source = self.get(name)
        if source.latest is None:
            raise NoFrameYet(f"source {name!r} has no segmented frame yet ({source.state}: {source.error or 'waiting'})")
        return source.latest

    def start(self) -> None:
        for source in self.sources.values():
            source.start()

    async def stop(self) -> None:
        self.closing = True
        await asyncio.gather(*(s.stop() for s in self.sources.values()))

    def end_streams(self) -> None:
        """Long-lived responses (MJPEG, WebSocket) end, so a shutdown does not wait for them."""
        self.closing = True
        for source in self.sources.values():
            source._wake_waiters()

    def readiness(self) -> dict[str, Any]:
        return {
            n: {"state": s.state, "error": s.error, "last_frame_age_s": s.frame_age()}
            for n, s in self.sources.items()
        }
