"""Image decoding in supervised, pre-started worker processes.

The image decoders are native code fed with bytes from the network: one crash among them
(OpenCV 5.0's APNG reader segfaulted on a 250-byte upload) would otherwise take the whole
daemon and every request in flight with it. Here a crash costs the one request: it is answered
400 naming the problem, the dead worker is replaced, the other workers keep decoding.

Each worker is a 'spawn' child (the machinery is :mod:`segd.child`, shared with the Edge TPU
worker) that imported OpenCV at start. Per request the parent probes the header (so it knows
the exact output size), makes a shared-memory segment of that size, sends the upload over the
worker's pipe and gets the RGB pixels written into shared memory. An image of up to
``STANDING_BYTES`` decoded (a 1080p frame) goes into the worker's standing segment, made once,
and is copied out: fresh pages for every request (a new segment, faulted in on both sides) cost
more than the copy. A larger image gets a segment of its own, used in place by the parent.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import queue
import signal
import threading
import time
from typing import Any

import numpy as np

from segd.child import (
    Child,
    backoff_delay,
    create_mapping,
    error_payload,
    open_mapping,
    rebuild_error,
    remove_segment,
    start_child,
)
from segd.errors import BadImage, RuntimeUnavailable
from segd.image.decode import DecodedImage, decode_image, decoded_hw, quiet_codec_warnings
from segd.image.header import ImageHeader

log = logging.getLogger("segd")

TEST_CRASH_MARKER = b"segd-test-hook:abort-the-decoder"
"""With the ``test_hooks`` setting on, a decode worker that finds these bytes in an upload
aborts (SIGABRT) instead of decoding: a real process death for the tests, whatever the
decoders' own bugs are at the time."""


STANDING_BYTES = 8 << 20
"""Each worker's standing output segment: images up to this many decoded bytes (1920x1080 RGB is
6.2 MB) are decoded into it and copied out. Its pages stay resident once touched, so the decode
workers hold at most ``decode_workers`` x this much shared memory between requests."""

TRIM_AFTER_BYTES = 16 << 20
"""Only a decode this large gives its freed heap back: malloc_trim walks the whole heap, which
costs more than a small image's decode (it made the 513x513 round trip 1.36x raw invoke)."""


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _tune_malloc() -> Any:
    """Keep a small image's decode buffers (up to ``STANDING_BYTES`` each) on the heap for the
    next decode to reuse, and return glibc's malloc_trim (None with another C library).

    By default glibc gave a freed buffer of this size back to the kernel, so every decode
    faulted its output in again: a 513x513 JPEG decoded in 1.25 ms instead of 0.6 ms. Larger
    buffers are still mapped and unmapped one by one and free heap over this size is given
    back, so a worker keeps about this much between requests."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, STANDING_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, STANDING_BYTES)
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_memory(trim: Any) -> None:
    """Give freed heap back to the system: a worker keeps running after a 40 MP decode, and
    glibc would otherwise keep tens of MB of that peak mapped."""
    if trim is not None:
        trim(0)


def _decode_main(conn: mpc.Connection) -> None:
    """A worker: load the decoders, then decode requests into the segments named, until the
    parent says stop or is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _, crash_marker, standing_name = conn.recv()
    standing = open_mapping(standing_name)
    quiet_codec_warnings()
    trim = _tune_malloc()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
            if message[0] != "decode":
                break
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break  # the parent is gone
        _, segment, header, reduce, max_pixels = message
        out: np.ndarray | None = None
        try:
            if crash_marker and crash_marker in data:
                os.abort()
            # No explicit close: an error's traceback still holds the array; the mapping goes
            # with the last reference (``out = None`` below).
            mapping = standing if segment is None else open_mapping(segment)
            h, w = decoded_hw(header, reduce)
            out = np.frombuffer(mapping, dtype=np.uint8, count=h * w * 3).reshape(h, w, 3)
            del mapping
            applied = decode_image(
                data, max_pixels=max_pixels, reduce=reduce, header=header, out=out
            ).reduce
            conn.send(("ok", applied))
        except Exception as exc:
            conn.send(("error", *error_payload(exc)))
        finally:
            big = out is not None and out.nbytes >= TRIM_AFTER_BYTES
            out = None
            del data
            if big:
                _release_free_memory(trim)
    conn.close()


class DecodeChild(Child):
    """A decode worker and the parent's mapping of its standing segment."""

    standing: mmap.mmap | None = None

    def copy_out(self, h: int, w: int) -> np.ndarray:
        """The image the worker left in its standing segment, as an array of the parent's own."""
        assert self.standing is not None
        return np.frombuffer(self.standing, dtype=np.uint8, count=h * w * 3).reshape(h, w, 3).copy()


class DecodePool:
    """``workers`` decode processes, started at once and replaced when one dies.

    :meth:`decode` has the signature of the in-process decoder (``segd.engine.Decoder``).
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        timeout: float = 30.0,
        start_timeout: float = 60.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        crash_marker: bytes | None = None,
        context: str = "spawn",
    ) -> None:
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        if context == "fork":
            raise ValueError("fork would copy the parent's threads' locks; use spawn or forkserver")
        self.workers = workers
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._crash_marker = crash_marker
        self._ctx = mp.get_context(context)
        self._idle: queue.Queue[DecodeChild] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._all: set[DecodeChild] = set()
        self._starters: list[threading.Thread] = []
        self._failures = 0  # failed starts in a row
        self.decoded = 0
        self.crashes = 0
        self.last_crash: str | None = None
        for _ in range(workers):
            self._start_later(0.0)

    # --- workers ---------------------------------------------------------------------------
    def _start_later(self, delay: float) -> None:
        starter = threading.Thread(
            target=self._start, args=(delay,), name="segd-decoder-start", daemon=True
        )
        with self._lock:
            self._starters = [t for t in self._starters if t.is_alive()]
            self._starters.append(starter)
        starter.start()

    def _start(self, delay: float) -> None:
        if self._stop.wait(delay):
            return
        try:
            child = self._spawn()
        except Exception as exc:
            with self._lock:
                self._failures += 1
                failures = self._failures
                self.last_crash = f"decoder start failed: {exc}"
            self._start_later(backoff_delay(failures, self.backoff_base, self.backoff_max))
            return
        with self._lock:
            self._failures = 0
            if not self._stop.is_set():
                self._all.add(child)
                self._idle.put(child)
                return
        child.stop(graceful=2.0)

    def _spawn(self) -> DecodeChild:
        from multiprocessing.reduction import ForkingPickler

        name, standing = create_mapping(STANDING_BYTES)
        try:
            payload = ForkingPickler.dumps(("start", self._crash_marker, name))
            child, sender = start_child(self._ctx, _decode_main, payload, "segd-decoder", DecodeChild)
            child.standing = standing
            with child.starting(sender):
                kind, message = child.receive(self.start_timeout)
                if kind != "msg" or message[0] != "ready":
                    raise RuntimeUnavailable(f"image decoder did not start ({kind}: {message})")
        finally:  # both sides have it mapped: nothing is left behind, however they end
            remove_segment(name)
        return child

    def _lose(self, child: DecodeChild, reason: str) -> None:
        """A worker died or hung: reap it and start its replacement at once."""
        with self._lock:
            self._all.discard(child)
            self.crashes += 1
            self.last_crash = f"{reason} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
        child.stop()
        log.warning("image decoder worker lost: %s; starting a new one", reason)
        if not self._stop.is_set():
            self._start_later(0.0)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(c.proc.pid for c in self._all)

    # --- decoding --------------------------------------------------------------------------
    def decode(
        self, data: bytes, *, header: ImageHeader, reduce: int, max_pixels: int
    ) -> DecodedImage:
        """Decode in a worker. A worker that dies (or overruns the timeout) on this image makes
        it a :class:`BadImage` (400); no idle worker within the timeout is a 503."""
        try:
            child = self._idle.get(timeout=self.timeout)
        except queue.Empty:
            raise RuntimeUnavailable(
                f"no image decoder became free within {self.timeout:g} s"
                + (f" (last failure: {self.last_crash})" if self.last_crash else "")
            ) from None
        h, w = decoded_hw(header, reduce)
        size = h * w * 3
        standing = size <= STANDING_BYTES
        segment, mapping = (None, None) if standing else create_mapping(size)
        try:
            try:
                child.conn.send(("decode", segment, header, reduce, max_pixels))
                child.conn.send_bytes(data)
            except (OSError, ValueError):
                pass  # the worker is gone: receive() says how
            kind, message = child.receive(self.timeout)
            if kind == "msg" and message[0] == "ok" and standing:
                rgb = child.copy_out(h, w)  # before the worker is given back
        except BaseException:
            if mapping is not None:
                mapping.close()
            self._lose(child, "interrupted during a request")
            raise
        finally:
            if segment is not None:
                remove_segment(segment)
        fmt = header.format.upper()
        if kind == "msg":
            self._give_back(child)
            if message[0] == "ok":
                self.decoded += 1
                if mapping is not None:
                    rgb = np.frombuffer(mapping, dtype=np.uint8, count=size).reshape(h, w, 3)
                return DecodedImage(rgb, header.oriented_hw, int(message[1]), header)
            if mapping is not None:
                mapping.close()
            raise rebuild_error(*message[1:])
        if mapping is not None:
            mapping.close()
        if kind == "timeout":
            self._lose(child, f"{fmt} decode overran {self.timeout:g} s (killed)")
            raise BadImage(
                f"the {fmt} decoder did not finish within {self.timeout:g} s on this image; "
                "it was stopped and the image refused"
            )
        self._lose(child, f"decoder {message} on a {fmt} image")
        raise BadImage(
            f"the {fmt} decoder crashed on this image ({message}); the image is refused, "
            "the decoder was restarted"
        )

    def _give_back(self, child: DecodeChild) -> None:
        with self._lock:
            if not self._stop.is_set():
                self._idle.put(child)
                return
            self._all.discard(child)
        child.stop(graceful=2.0)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "workers": self.workers,
                "running": len(self._all),
                "idle": self._idle.qsize(),
                "decoded": self.decoded,
                "crashes": self.crashes,
                "restarts": self.crashes,  # every lost worker is replaced at once
                "last_crash": self.last_crash,
            }

    def close(self) -> None:
        """Stop every worker (busy ones when they hand their request back)."""
        with self._lock:
            self._stop.set()
            starters = list(self._starters)
        for starter in starters:
            if starter is not threading.current_thread():
                starter.join(self.start_timeout + 5.0)
        while True:
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self._all.discard(child)
            child.stop(graceful=2.0)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["STANDING_BYTES", "TEST_CRASH_MARKER", "DecodePool"]
