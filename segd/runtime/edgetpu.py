"""Edge TPU backend: libedgetpu's public C API through ctypes, and its TFLite delegate plugin.

No TensorFlow and no pycoral: device listing and the version come straight from
``edgetpu_c.h`` (``edgetpu_list_devices``/``edgetpu_free_devices``/``edgetpu_version``), and the
interpreter is built by the installed TFLite runtime with ``load_delegate(libedgetpu, {'device':
...})`` — the same plugin entry points (``tflite_plugin_create_delegate``) the Coral docs use.

libedgetpu can abort the whole process (USB transfer errors do), so the daemon runs
:func:`open_edgetpu` inside :class:`segd.runtime.worker.WorkerRunner`'s child process; the
functions here only load the library and never touch a device except :func:`open_edgetpu`.

Known incompatibility: the stock ``libedgetpu1-std`` 16.0 from the Coral apt repository (its
``edgetpu_version()`` ends in ``RuntimeVersion(14)``) was built against the TFLite of that time;
inside ``tflite_runtime`` newer than 2.11.1 (the last wheel Coral built) it crashes. Use
tflite_runtime <= 2.11.1 with it, or a libedgetpu rebuilt against the newer TFLite.
:func:`compatibility_warning` names that case; :func:`open_edgetpu` logs it and adds it to its
error text.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from segd.errors import ModelError, RuntimeUnavailable
from segd.runtime.base import InterpreterRunner
from segd.runtime.cpu import make_interpreter, runtime_label, runtime_module
from segd.settings import env_edgetpu_library

log = logging.getLogger(__name__)

DEFAULT_LIBRARY = "libedgetpu.so.1"
CUSTOM_OP = "edgetpu-custom-op"
INSTALL_HINT = "install libedgetpu1-std from the Coral apt repository"

# enum edgetpu_device_type in edgetpu_c.h
_DEVICE_TYPES = {0: "pci", 1: "usb"}
# What libedgetpu's plugin accepts as its "device" option.
_DEVICE_OPTION = re.compile(r"^(?:(usb|pci)(?::(\d+))?|:(\d+)|)$")
_LAST_COMPATIBLE_TFLITE_RUNTIME = (2, 11, 1)
_STOCK_RUNTIME_VERSION = 14  # libedgetpu1-std 16.0


class _CDevice(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("path", ctypes.c_char_p)]


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


def _load(library: str | None) -> tuple[str, ctypes.CDLL]:
    lib = library or library_path()
    try:
        return lib, ctypes.CDLL(lib)
    except OSError as exc:
        raise RuntimeUnavailable(f"libedgetpu not installed ({exc}) — {INSTALL_HINT}") from exc


def _symbol(handle: ctypes.CDLL, lib: str, name: str) -> Any:
    try:
        return getattr(handle, name)
    except AttributeError as exc:
        raise RuntimeUnavailable(f"{lib} is not libedgetpu (it has no {name})") from exc


def list_devices(library: str | None = None) -> list[EdgeTpuDevice]:
    """The Edge TPUs libedgetpu enumerates, in its order (the order ``:N`` device options use)."""
    lib, handle = _load(library)
    list_fn = _symbol(handle, lib, "edgetpu_list_devices")
    free_fn = _symbol(handle, lib, "edgetpu_free_devices")
    list_fn.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
    list_fn.restype = ctypes.POINTER(_CDevice)
    free_fn.argtypes = [ctypes.POINTER(_CDevice)]
    free_fn.restype = None
    count = ctypes.c_size_t(0)
    array = list_fn(ctypes.byref(count))
    try:
        if not array:
            return []
        devices = []
        for i in range(count.value):
            raw = array[i]
            kind = _DEVICE_TYPES.get(raw.type, f"type{raw.type}")
            path = raw.path.decode("utf-8", "replace") if raw.path else ""
            devices.append(EdgeTpuDevice(kind, path))
        return devices
    finally:
        if array:
            free_fn(array)


def edgetpu_version(library: str | None = None) -> str | None:
    """libedgetpu's version string, or None when the library cannot be loaded or has none."""
    try:
        lib, handle = _load(library)
        fn = _symbol(handle, lib, "edgetpu_version")
    except RuntimeUnavailable:
        return None
    fn.argtypes = []
    fn.restype = ctypes.c_char_p
    raw = fn()
    return raw.decode("utf-8", "replace") if raw else None


def runtime_version_of(version: str | None) -> int | None:
    """The N of ``RuntimeVersion(N)`` in a libedgetpu version string."""
    match = re.search(r"RuntimeVersion\((\d+)\)", version or "")
    return int(match.group(1)) if match else None


def _short_version(version: str | None) -> str:
    runtime = runtime_version_of(version)
    if runtime is not None:
        return f"runtime version {runtime}"
    return version or "of unknown version"


def library_status(library: str | None = None) -> EdgeTpuStatus:
    """Can an Edge TPU be used here, and if not, why (a sentence a person can act on)?"""
    lib = library or library_path()
    try:
        _load(lib)
    except RuntimeUnavailable as exc:
        return EdgeTpuStatus(lib, False, None, (), exc.detail)
    version = edgetpu_version(lib)
    try:
        devices = list_devices(lib)
    except RuntimeUnavailable as exc:
        return EdgeTpuStatus(lib, True, version, (), exc.detail)
    if not devices:
        reason = (
            f"no Edge TPU found (libedgetpu {_short_version(version)} sees no USB or PCIe device)"
        )
        return EdgeTpuStatus(lib, True, version, (), reason)
    return EdgeTpuStatus(lib, True, version, tuple(devices), None)


probe = library_status  # the name before "probe" was taken by the image header; use library_status


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def compatibility_warning(
    runtime: str, runtime_version: str | None, libedgetpu_version: str | None
) -> str | None:
    """The known-bad pairing (stock libedgetpu 16 inside tflite_runtime > 2.11.1), as a sentence."""
    if runtime != "tflite_runtime" or not runtime_version:
        return None
    if _version_tuple(runtime_version) <= _LAST_COMPATIBLE_TFLITE_RUNTIME:
        return None
    if runtime_version_of(libedgetpu_version) != _STOCK_RUNTIME_VERSION:
        return None
    return (
        f"tflite_runtime {runtime_version} with libedgetpu runtime version {_STOCK_RUNTIME_VERSION} "
        "(libedgetpu1-std 16.0): the stock libedgetpu is known to crash inside tflite_runtime newer "
        "than 2.11.1 — install tflite_runtime 2.11.1 or a libedgetpu built for this TFLite"
    )


def device_option(device: str | None, devices: list[EdgeTpuDevice] | None = None) -> str:
    """The ``device`` option for libedgetpu's plugin. Its own forms ('', 'usb', 'usb:N', 'pci',
    'pci:N', ':N') pass through; a device path becomes ':N', its index in ``devices`` (what
    :func:`list_devices` returns), since the plugin itself does not accept paths."""
    if device is None:
        return ""
    if _DEVICE_OPTION.match(device):
        return device
    for index, dev in enumerate(devices or []):
        if dev.path == device:
            return f":{index}"
    listed = ", ".join(f"{d.type} {d.path}" for d in devices or []) or "none"
    raise RuntimeUnavailable(
        f"no Edge TPU at {device!r} (libedgetpu lists: {listed}); use a listed path or "
        "'usb', 'usb:N', 'pci', 'pci:N', ':N'"
    )


def _listed(devices: list[EdgeTpuDevice]) -> str:
    if not devices:
        return "libedgetpu lists no device"
    return "libedgetpu lists " + ", ".join(f"{d.type} {d.path}" for d in devices)


def _select(option: str, devices: list[EdgeTpuDevice]) -> EdgeTpuDevice | None:
    """The device libedgetpu's plugin picks for ``option`` (same rules as the plugin)."""
    match = _DEVICE_OPTION.match(option)
    if not match:
        return None
    kind, nth_of_kind, nth = match.groups()
    if nth is not None:
        index = int(nth)
        return devices[index] if index < len(devices) else None
    candidates = [d for d in devices if kind is None or d.type == kind]
    index = int(nth_of_kind or 0)
    return candidates[index] if index < len(candidates) else None


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
    """An interpreter with the Edge TPU delegate; every failure is a RuntimeUnavailable that says
    why. Run it in a worker process: libedgetpu may abort the process it runs in."""
    lib = library or library_path()
    name, module = runtime_module(runtime)
    label = runtime_label(name)
    devices = list_devices(lib)  # also proves the library loads and is libedgetpu
    option = device_option(device, devices)
    version = edgetpu_version(lib)
    warning = compatibility_warning(name, label.rpartition(" ")[2], version)
    if warning:
        log.warning("Edge TPU: %s", warning)
    note = f" [{warning}]" if warning else ""
    shown = option or "(any)"

    options = {"device": option} if device is not None else {}
    try:
        delegate = module.load_delegate(lib, options)
    except OSError as exc:
        raise RuntimeUnavailable(f"libedgetpu not installed ({exc}) — {INSTALL_HINT}") from exc
    except AttributeError as exc:
        raise RuntimeUnavailable(f"{lib} is not a TFLite delegate plugin ({exc})") from exc
    except ValueError as exc:
        # load_delegate: "Failed to load delegate from <lib>\n<what the plugin reported>"
        message = str(exc).partition("\n")[2].strip()
        if not message:
            if not devices:
                raise RuntimeUnavailable(
                    f"no Edge TPU found (libedgetpu {_short_version(version)} sees no USB or PCIe "
                    f"device){note}"
                ) from exc
            raise RuntimeUnavailable(
                f"libedgetpu could not open device {shown} (no Edge TPU attached?); "
                f"{_listed(devices)}{note}"
            ) from exc
        raise RuntimeUnavailable(
            f"Edge TPU delegate creation failed on device {shown}: {message}{note}"
        ) from exc

    threads = num_threads or os.cpu_count() or 1
    try:
        interp = make_interpreter(module, model_content, num_threads=threads, delegates=[delegate])
    except ModelError as exc:
        if CUSTOM_OP in exc.detail:
            raise RuntimeUnavailable(
                f"the Edge TPU delegate from {lib} did not take the model's {CUSTOM_OP} ops "
                f"(unresolved custom op '{CUSTOM_OP}'): {exc.detail}{note}"
            ) from exc
        raise RuntimeUnavailable(
            f"the model failed with the Edge TPU delegate ({label}): {exc.detail}{note}"
        ) from exc

    # The device path (e.g. /sys/bus/usb/devices/2-1, /dev/apex_0) is what identifies the chip
    # later, when the daemon checks that it is still attached.
    picked = _select(option, devices)
    where = picked.path if picked else shown
    return InterpreterRunner(interp, backend="edgetpu", runtime=label, device=where)
