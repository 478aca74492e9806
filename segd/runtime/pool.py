"""Several Edge TPUs serving one model: one supervised worker per device, least-loaded dispatch.

Each device gets its own :class:`segd.runtime.worker.WorkerRunner` (its own process, restart
backoff and shared memory), opened on the device's *path* as libedgetpu enumerates it, so a
restart after an unplug finds the same chip again even when the enumeration order changed (the
path is resolved to libedgetpu's ``:N`` at every start). A device that fails — its worker dies,
hangs, or the device is unplugged — takes only its own worker down: the pool sends the request
to another device and stops choosing the failed one until its worker is serving again.

Why one worker per (device, model) and not several models per device: an Edge TPU has 8 MB of
on-chip memory for parameters; the served DeepLab files are 1.1-3.1 MB compiled
(``deeplabv3_mnv2_dm05_pascal`` 1.1 MB, ``deeplabv3_mnv2_pascal`` 2.9 MB,
``deeplab_edgetpu_slim_cityscapes`` 3.1 MB), so two could share a device, but only when compiled
*together* (``edgetpu_compiler a.tflite b.tflite`` gives both the same caching token); files
compiled one by one evict each other's parameters on every switch. segd serves the published,
separately compiled files, so each (device, model) pair gets its own worker.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segd.errors import RequestTimeout, RuntimeUnavailable, WorkerCrashed
from segd.runtime.base import Runner, TensorSpec, describe_runner


def resolve_devices(wanted: Sequence[str], listed: Sequence[Any]) -> list[str]:
    """Device paths for ``devices = [...]`` or ``["all"]``: "all" = every device libedgetpu
    lists; ``usb:N`` / ``pci:N`` / ``:N`` / ``usb`` / ``pci`` = that device of the current list;
    a path = itself. Each device once, in the order given."""
    from segd.runtime.edgetpu import device_option, select_device

    if list(wanted) == ["all"]:
        paths = [d.path for d in listed]
        if not paths:
            raise RuntimeUnavailable("devices = all, but libedgetpu lists no Edge TPU")
        return paths
    paths = []
    for name in wanted:
        option = device_option(name, list(listed))
        picked = select_device(option, list(listed))
        if picked is None:
            shown = ", ".join(f"{d.type} {d.path}" for d in listed) or "none"
            raise RuntimeUnavailable(f"no Edge TPU {name!r} (libedgetpu lists: {shown})")
        if picked.path not in paths:
            paths.append(picked.path)
    return paths


class _Device:
    """One device's worker and what the pool knows about it."""

    def __init__(self, path: str, runner: Runner) -> None:
        self.path = path
        self.runner = runner
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.present = True
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=1024)
        # an in-process interpreter (tpu_isolation off) takes one caller at a time
        self.serial = contextlib.nullcontext() if getattr(runner, "thread_safe", False) else threading.Lock()

    def usable(self) -> bool:
        state = getattr(self.runner, "state", "ready")
        return self.present and state == "ready"

    def describe(self) -> dict[str, Any]:
        info = self.runner.describe()
        lat = None
        if self.latencies_ms:
            p50, p99 = np.percentile(np.fromiter(self.latencies_ms, dtype=np.float64), [50, 99])
            lat = {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
        return {
            "device": self.path,
            "state": info.get("state", "ready") if self.present else "absent",
            "present": self.present,
            "pid": info.get("pid"),
            "in_flight": self.in_flight,
            "requests": self.requests,
            "errors": self.errors,
            "restarts": info.get("restarts", 0),
            "crashes": info.get("crashes", 0),
            "last_crash": info.get("last_crash"),
            "latency_ms": lat,
        }


class DevicePool:
    """A Runner over one worker per Edge TPU. ``run`` is thread-safe: up to ``parallelism``
    callers run at once, each on the least-loaded usable device; a device failure is retried
    once on each other usable device before the error reaches the caller."""

    backend = "edgetpu"
    thread_safe = True

    def __init__(self, devices: list[tuple[str, Runner]], open_one: Callable[[str], Runner] | None = None) -> None:
        if not devices:
            raise RuntimeUnavailable("no Edge TPU to serve on")
        self._devices = [_Device(path, runner) for path, runner in devices]
        first = self._devices[0].runner
        self.runtime: str = first.runtime
        self.input: TensorSpec = first.input
        self.output: TensorSpec = first.output
        self.device: str | None = ",".join(d.path for d in self._devices)
        # callers kept busy: every device's worker pipelines its own requests
        self.parallelism = sum(int(getattr(d.runner, "parallelism", 1)) for d in self._devices)
        self._lock = threading.Lock()
        self._open_one = open_one

    @classmethod
    def open(cls, paths: Sequence[str], open_one: Callable[[str], Runner]) -> DevicePool:
        """Open a worker on every device; devices that fail to open are reported, not fatal
        (their worker is simply missing) unless none opens."""
        opened: list[tuple[str, Runner]] = []
        failures = []
        for path in paths:
            try:
                opened.append((path, open_one(path)))
            except Exception as exc:  # this device only: the others still serve
                failures.append(f"{path}: {getattr(exc, 'detail', None) or exc}")
        if not opened:
            raise RuntimeUnavailable("no Edge TPU could be opened: " + "; ".join(failures))
        return cls(opened, open_one)

    def adopt(self, listed_paths: Sequence[str]) -> list[str]:
        """Open a worker on each listed device the pool does not have yet (``devices = all``:
        a TPU plugged in after start-up); returns the paths added. A device that fails to open
        is tried again at the next call."""
        if self._open_one is None:
            return []
        with self._lock:
            known = {d.path for d in self._devices}
        added = []
        for path in listed_paths:
            if path in known:
                continue
            try:
                runner = self._open_one(path)
            except Exception:  # not usable yet (still enumerating, firmware loading): next time
                continue
            try:
                runner.run(np.zeros(self.input.shape, self.input.dtype))  # warm-up
            except Exception:
                runner.close()
                continue
            with self._lock:
                self._devices.append(_Device(path, runner))
                self.device = ",".join(d.path for d in self._devices)
                self.parallelism += int(getattr(runner, "parallelism", 1))
            added.append(path)
        return added

    def _pick(self, tried: set[int]) -> int | None:
        """Index of the usable device with the fewest requests in flight (ties: fewest served)."""
        best = None
        for i, dev in enumerate(self._devices):
            if i in tried or not dev.usable():
                continue
            key = (dev.in_flight, dev.requests)
            if best is None or key < best[0]:
                best = (key, i)
        return None if best is None else best[1]

    def run(self, tensor: np.ndarray) -> np.ndarray:
        tried: set[int] = set()
        last: Exception | None = None
        while True:
            with self._lock:
                index = self._pick(tried)
                if index is None:
                    break
                dev = self._devices[index]
                dev.in_flight += 1
                dev.requests += 1
            t0 = time.perf_counter()
            try:
                with dev.serial:
                    out = dev.runner.run(tensor)
            except (WorkerCrashed, RequestTimeout, RuntimeUnavailable, RuntimeError) as exc:
                # this device failed (its worker restarts on its own): try another one
                with self._lock:
                    dev.errors += 1
                last = exc
                tried.add(index)
                continue
            finally:
                with self._lock:
                    dev.in_flight -= 1
            with self._lock:
                dev.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
            return out
        if last is not None:
            raise last
        states = ", ".join(f"{d.path} {'absent' if not d.present else getattr(d.runner, 'state', '?')}"
                           for d in self._devices)  # fmt: skip
        raise WorkerCrashed(f"no Edge TPU is serving ({states})")

    def run_on_each(self, tensor: np.ndarray) -> list[np.ndarray]:
        """The same input on every device (the start-up self-test checks each chip)."""
        return [dev.runner.run(tensor) for dev in self._devices]

    def mark_present(self, listed_paths: set[str]) -> list[tuple[str, bool]]:
        """Record which devices libedgetpu still lists; returns the (path, present) changes."""
        changes = []
        with self._lock:
            for dev in self._devices:
                present = dev.path in listed_paths
                if present != dev.present:
                    changes.append((dev.path, present))
                dev.present = present
        return changes

    @property
    def any_present(self) -> bool:
        return any(d.present for d in self._devices)

    @property
    def any_usable(self) -> bool:
        return any(d.usable() for d in self._devices)

    @property
    def state(self) -> str:
        return "ready" if self.any_usable else "restarting"

    def devices(self) -> list[dict[str, Any]]:
        with self._lock:
            return [d.describe() for d in self._devices]

    def describe(self) -> dict[str, Any]:
        devices = self.devices()
        return {
            **describe_runner(self),
            "isolation": "process",
            "state": self.state,
            "devices": devices,
            "restarts": sum(int(d["restarts"] or 0) for d in devices),
            "crashes": sum(int(d["crashes"] or 0) for d in devices),
        }

    def close(self) -> None:
        with self._lock:
            self._open_one = None  # no adoption after close
        for dev in list(self._devices):
            dev.runner.close()


__all__ = ["DevicePool", "resolve_devices"]
