"""What the service keeps per served model, and the bookkeeping admission and the readiness
report need: a model's service time, the memory budget of the requests in flight, a route's
``Result``, and the device-state helpers. Split from ``segd.app.service`` (loading, admission
and the request pipeline), which re-exports ``ModelSlot`` and ``Result``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segd.engine import Segmentation, Segmenter
from segd.errors import ImageTooLarge
from segd.settings import MiB
from segd.variants import Variant


class ServiceTime:
    """How long a model takes per request, as admission needs it (seconds): an exponentially
    weighted mean of the time between completions while other requests were in flight (the
    rate the queue drains at, contention included), or of a request's latency when it ran
    alone; seeded by the warm-up. Stage timings are no measure: they include waits."""

    def __init__(self, seconds: float = 0.5, weight: float = 0.1) -> None:
        self.seconds = seconds
        self.weight = weight
        self.last_done: float | None = None

    def completed(self, now: float, latency: float, busy: bool) -> None:
        sample = latency
        if busy and self.last_done is not None:
            sample = min(now - self.last_done, latency)
        self.seconds += self.weight * (sample - self.seconds)
        self.last_done = now


async def in_thread(executor: Executor, fn: Any, *args: Any) -> Any:
    """Run ``fn`` on ``executor``. If the awaiting request is cancelled (timeout, client gone)
    while the thread runs, wait for the thread before unwinding: its memory stays in use until
    it returns, so the memory budget must not be released earlier."""
    job = executor.submit(fn, *args)
    try:
        return await asyncio.shield(asyncio.wrap_future(job))
    except asyncio.CancelledError:
        if not job.cancel():  # already running: let it finish
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(job)
        raise


class MemoryBudget:
    """Bounds the bytes of all the requests being processed at once. A request holds what its
    header says it may need at peak (``segd.image.decode.request_bytes``: the upload, the decoder's
    buffers by bit depth / channels / alpha, the RGB image, the mask and the rendered answer)
    from decode until its answer is encoded. Without it, four 10 MP 16-bit RGBA PNGs were
    admitted together and took 2.5 GB. Large images wait for each other; small ones still run
    together; an image that could never fit is refused up front (413)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    def check(self, need: int, what: str) -> None:
        if need > self.limit:
            raise ImageTooLarge(
                f"{what} needs about {need / MiB:.0f} MiB to process, over the memory budget of "
                f"{self.limit / MiB:.0f} MiB (setting memory_budget)"
            )

    async def acquire(self, need: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + need <= self.limit)
            self.used += need
        return need

    async def release(self, need: int) -> None:
        async with self._changed:
            self.used -= need
            self._changed.notify_all()


@dataclass
class Result:
    """What a route needs to answer: the body plus the facts for headers."""

    body: bytes
    media_type: str
    model: str
    backend: str
    timings: dict[str, float]
    document: dict[str, Any]  # the JSON summary (the body of format=json, a header otherwise)
    segmentation: Segmentation | None = None  # mask and decoded image, for the camera sources


@dataclass
class ModelSlot:
    """One served variant and everything the service knows about it."""

    name: str
    variant: Variant
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    primary: Segmenter | None = None
    fallback: Segmenter | None = None  # CPU twin of an Edge TPU primary
    executor: Executor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="invoke"))
    fallback_executor: Executor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="invoke-cpu"))
    load_seconds: float | None = None
    selftest: dict[str, Any] = field(default_factory=dict)
    device_present: bool = True
    queued: int = 0  # admitted requests (in flight + waiting)
    service: ServiceTime = field(default_factory=ServiceTime)
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    latencies_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2048))

    @property
    def can_answer(self) -> bool:
        """Requests get an answer: on its device, or on the CPU twin when the device is gone."""
        return self.ready or (self.fallback is not None and self.state == "ready")

    @property
    def ready(self) -> bool:
        if self.state != "ready" or self.primary is None:
            return False
        return self.device_present or self.primary.backend != "edgetpu"

    def widen_executor(self, threads: int) -> None:
        """One invoke thread for every request the Edge TPU workers hold (``threads``); the old
        executor finishes what it holds."""
        old, self.executor = self.executor, ThreadPoolExecutor(threads, thread_name_prefix="invoke")
        old.shutdown(wait=False)

    def latency_percentiles(self) -> dict[str, float | None]:
        if not self.latencies_ms:
            return {"p50": None, "p90": None, "p99": None}
        values = np.fromiter(self.latencies_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}

    def worker_info(self) -> dict[str, Any] | None:
        """State of the Edge TPU worker process (pid, state, restarts, last crash), if any."""
        runner = self.primary.runner if self.primary else None
        if runner is None or runner.backend != "edgetpu":
            return None
        info = runner.describe()
        if info.get("isolation") != "process":
            return None
        keys = ("pid", "state", "restarts", "crashes", "last_crash", "retry_in", "devices", "runtime", "python", "pairing")
        return {k: info[k] for k in keys if k in info}

    def describe(self) -> dict[str, Any]:
        # Once loaded, the variant that runs: tensors read from the file, or the CPU fallback.
        v = self.primary.variant if self.primary is not None else self.variant
        doc: dict[str, Any] = {
            "name": self.name,
            "description": self.variant.description,
            "state": self.state,
            "ready": self.ready,
            "error": self.error,
            "input_size": list(v.input.hw) if v.input.shape else None,
            "output": {
                "kind": v.output.kind,
                "shape": list(v.output.shape) or None,
                "stride": v.output.stride,
                "align_corners": v.output.align_corners,
            },
            "labels": list(self.variant.labels.names),
            "load_seconds": round(self.load_seconds, 3) if self.load_seconds is not None else None,
            "selftest": self.selftest,
            "requests": self.requests,
            "errors": self.errors,
            "cpu_fallbacks": self.fallbacks,
            "queue": self.queued,
            "latency_ms": self.latency_percentiles(),
        }
        if self.primary is not None:
            seg = self.primary.describe()
            doc.update(
                backend=seg["backend"], reason=seg["reason"], device=seg["device"],
                runtime=seg["runtime"], file=seg["file"], sha256=seg["sha256"],
                device_present=self.device_present if seg["backend"] == "edgetpu" else None,
            )  # fmt: skip
            worker = self.worker_info()
            if worker is not None:
                doc["worker"] = worker
        else:
            doc.update(backend=None, reason=None, device=None, file=None, sha256=None)
        return doc


_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\":,;()]+/)*([^\s/'\":,;()]+)")


def without_paths(text: str | None) -> str | None:
    """``text`` with absolute file-system paths cut to their file names: /readyz is
    unauthenticated and must not map the host's directories (/models keeps the full error)."""
    return _PATH.sub(r"\1", text) if text else text
def device_states(slot: ModelSlot) -> dict[str, Any]:
    """``{"devices": {path: state}}`` for a model on several Edge TPUs, else nothing."""
    worker = slot.worker_info() or {}
    if "devices" not in worker:
        return {}
    return {"devices": {d["device"]: d["state"] for d in worker["devices"]}}


def device_present(wanted: str | None, devices: list[Any]) -> bool:
    """Is the device a runner was opened on (``usb``, ``usb:1``, ``pci:0``, ``:0``, a path)
    still among ``devices`` (``EdgeTpuDevice(type, path)``)?"""
    if not wanted:
        return bool(devices)
    kind, _, index = wanted.partition(":")
    if kind in ("usb", "pci", ""):
        pool = [d for d in devices if not kind or d.type == kind]
        return len(pool) > (int(index) if index.isdigit() else 0)
    return any(d.path == wanted for d in devices)
