"""Edge TPU backend: libedgetpu's public C API through ctypes, and its TFLite delegate plugin.

No TensorFlow and no pycoral: device listing and the version come straight from
``edgetpu_c.h`` (``edgetpu_list_devices``/``edgetpu_free_devices``/``edgetpu_version``), and the
interpreter is built by a TFLite runtime with ``load_delegate(libedgetpu, {'device': ...})`` —
the same plugin entry points (``tflite_plugin_create_delegate``) the Coral docs use. The code
that touches libedgetpu and the runtime lives in :mod:`segd.runtime.tpu_worker` (so the worker
can run it under another Python); this module gives it segd's types and errors.

libedgetpu is linked against the TFLite of the TensorFlow it was built from and can segfault
inside another one (the stock 16.0 inside any TFLite newer than 2.11.x): :func:`check_pairing`
decides from ``segd/data/edgetpu_pairings.toml`` which runtime it may be loaded into, before
anything loads the delegate. libedgetpu can also abort the whole process (USB transfer errors
do), so the daemon runs the interpreter in :class:`segd.runtime.worker.WorkerRunner`'s child.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segd.errors import ModelError, RuntimeUnavailable
from segd.runtime import pairing, tpu_worker
from segd.runtime.base import InterpreterRunner
from segd.settings import env_edgetpu_library

DEFAULT_LIBRARY = tpu_worker.DEFAULT_LIBRARY
CUSTOM_OP = tpu_worker.CUSTOM_OP
INSTALL_HINT = tpu_worker.INSTALL_HINT
runtime_version_of = pairing.runtime_version_of


@dataclass(frozen=True)
class EdgeTpuDevice:
    type: str  # "usb" | "pci"
    path: str

    def describe(self) -> dict[str, str]:
        return {"type": self.type, "path": self.path}


@dataclass(frozen=True)
class EdgeTpuStatus:
    """What libedgetpu says about this machine. ``reason`` is None exactly when a TPU is usable."""

    library: str
    loadable: bool
    version: str | None = None
    devices: tuple[EdgeTpuDevice, ...] = field(default_factory=tuple)
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.reason is None

    def describe(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "loadable": self.loadable,
            "version": self.version,
            "devices": [d.describe() for d in self.devices],
            "reason": self.reason,
        }


def library_path() -> str:
    """The libedgetpu to load: ``SEGD_EDGETPU_LIBRARY`` or the soname the dynamic loader finds."""
    return env_edgetpu_library() or DEFAULT_LIBRARY


def _typed(exc: tpu_worker.WorkerError) -> RuntimeUnavailable | ModelError:
    return ModelError(str(exc)) if isinstance(exc, tpu_worker.ModelRefused) else RuntimeUnavailable(str(exc))


def list_devices(library: str | None = None) -> list[EdgeTpuDevice]:
    """The Edge TPUs libedgetpu enumerates, in its order (the order ``:N`` device options use)."""
    try:
        return [EdgeTpuDevice(t, p) for t, p in tpu_worker.list_devices(library or library_path())]
    except tpu_worker.WorkerError as exc:
        raise _typed(exc) from exc


def edgetpu_version(library: str | None = None) -> str | None:
    """libedgetpu's version string, or None when the library cannot be loaded or has none."""
    try:
        return tpu_worker.edgetpu_version(library or library_path())
    except tpu_worker.WorkerError:
        return None


def library_status(library: str | None = None) -> EdgeTpuStatus:
    """Can an Edge TPU be used here, and if not, why (a sentence a person can act on)?"""
    lib = library or library_path()
    try:
        tpu_worker.load_library(lib)
    except tpu_worker.WorkerError as exc:
        return EdgeTpuStatus(lib, False, None, (), str(exc))
    version = edgetpu_version(lib)
    try:
        devices = list_devices(lib)
    except RuntimeUnavailable as exc:
        return EdgeTpuStatus(lib, True, version, (), exc.detail)
    if not devices:
        reason = f"no Edge TPU found (libedgetpu {tpu_worker.short_version(version)} sees no USB or PCIe device)"
        return EdgeTpuStatus(lib, True, version, (), reason)
    return EdgeTpuStatus(lib, True, version, tuple(devices), None)




def device_option(device: str | None, devices: list[EdgeTpuDevice] | None = None) -> str:
    """The ``device`` option for libedgetpu's plugin. Its own forms ('', 'usb', 'usb:N', 'pci',
    'pci:N', ':N') pass through; a device path becomes ':N', its index in ``devices`` (what
    :func:`list_devices` returns), since the plugin itself does not accept paths."""
    try:
        return tpu_worker.device_option(device, [(d.type, d.path) for d in devices or []])
    except tpu_worker.WorkerError as exc:
        raise _typed(exc) from exc


def select_device(option: str, devices: list[EdgeTpuDevice]) -> EdgeTpuDevice | None:
    """The device libedgetpu's plugin picks for a ``device`` option (same rules as the plugin)."""
    picked = tpu_worker.select_device(option, [(d.type, d.path) for d in devices])
    return EdgeTpuDevice(*picked) if picked else None


def observe_library(library: str | None = None, *, admindir: Path = pairing.DPKG_ADMINDIR,
                    table: pairing.Table | None = None) -> pairing.Library:  # fmt: skip
    """What identifies the libedgetpu that would be loaded: its file, the Debian package that
    owns it, its sha256 and ``edgetpu_version()`` (loading the library runs no delegate code)."""
    lib = library or library_path()
    try:
        path = tpu_worker.library_file(lib)
    except tpu_worker.WorkerError as exc:
        raise _typed(exc) from exc
    return pairing.observe(lib, path, edgetpu_version(lib), admindir=admindir, table=table)


def check_pairing(
    runtimes: dict[str, str | None],
    *,
    library: str | None = None,
    policy: str = "check",
    pairings: Path | None = None,
    preferred: str | None = None,
    admindir: Path = pairing.DPKG_ADMINDIR,
) -> pairing.Decision:
    """The runtime (among ``runtimes``, those installed where the interpreter will run) that this
    libedgetpu may be loaded into; a refusal raises RuntimeUnavailable saying what to install."""
    try:
        table = pairing.Table.load(pairings)
    except ValueError as exc:
        raise RuntimeUnavailable(str(exc)) from exc
    decision = pairing.decide(observe_library(library, admindir=admindir, table=table), runtimes,
                              table=table, policy=policy, preferred=preferred)  # fmt: skip
    if decision.runtime is None:
        raise RuntimeUnavailable(decision.message)
    return decision


def open_paired(
    model_content: bytes,
    *,
    device: str | None = None,
    library: str | None = None,
    policy: str = "check",
    pairings: Path | None = None,
    preferred: str | None = None,
    num_threads: int | None = None,
) -> InterpreterRunner:
    """The Edge TPU in this process: :func:`check_pairing` picks the runtime this libedgetpu may
    be loaded into (or refuses), then :func:`open_edgetpu` loads it there."""
    decision = check_pairing(tpu_worker.runtime_versions(), library=library, policy=policy,
                             pairings=pairings, preferred=preferred)  # fmt: skip
    return open_edgetpu(model_content, device=device, library=library, runtime=decision.runtime,
                        num_threads=num_threads)  # fmt: skip


#: What segd's latency-simulating test double (tests/edgetpu_double, FAKE_EDGETPU_MODE=latency)
#: puts in its edgetpu_version(); no real libedgetpu does.
SIMULATOR_MARK = "segd-simulated-edgetpu"


def is_simulator(library: str | None = None) -> bool:
    """Is the libedgetpu that loads the benchmark's simulator (not a real Edge TPU runtime)?"""
    return SIMULATOR_MARK in (edgetpu_version(library) or "")


def open_edgetpu(
    model_content: bytes,
    *,
    device: str | None = None,
    library: str | None = None,
    runtime: str | None = None,
    num_threads: int | None = None,
) -> InterpreterRunner:
    """An interpreter with the Edge TPU delegate inside ``runtime`` (default: the first
    installed, tflite_runtime before ai-edge-litert); every failure is a RuntimeUnavailable that
    says why. This loads what it is told: :func:`check_pairing` first decides whether it may."""
    lib = library or library_path()
    if runtime is None:
        installed = tpu_worker.runtime_versions()
        runtime = next((n for n in tpu_worker.TPU_PREFERENCE if installed.get(n)), "litert")
    try:
        interp, label, where = tpu_worker.open_interpreter(
            model_content, library=lib, runtime=runtime, device=device, num_threads=num_threads
        )
    except tpu_worker.WorkerError as exc:
        raise _typed(exc) from exc
    # The device path (e.g. /sys/bus/usb/devices/2-1, /dev/apex_0) is what identifies the chip
    # later, when the daemon checks that it is still attached.
    return InterpreterRunner(interp, backend="edgetpu", runtime=label, device=where)
