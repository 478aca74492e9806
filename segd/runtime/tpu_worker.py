"""The Edge TPU worker program: libedgetpu's C API, the delegate, the interpreter, and the
worker's side of the shared-memory protocol — in one file that imports only the standard
library, numpy (1.x or 2.x) and a TFLite runtime.

Why a file of its own: the TFLite runtime libedgetpu works with may need another Python or
numpy than the daemon's (tflite_runtime 2.17.1 wheels are cp311 and built against numpy 1.x,
ai-edge-litert wants numpy 2). So the daemon can start this file under any Python
(``python -I tpu_worker.py FD``, setting ``edgetpu_python``); it never imports segd. Inside the
daemon the same functions serve ``segd.runtime.edgetpu`` and the spawn-based worker.

Protocol over the socket FD (``multiprocessing.connection`` framing, pickles of builtins only):

    worker -> daemon  ("hello", {"python", "numpy", "runtimes": {name: version | None}})
    daemon -> worker  ("start", {"model", "library", "runtime", "device", "num_threads"})
                      | ("close",)                       # the daemon refused the pairing
    worker -> daemon  ("ready", info) | ("error", module, type name, message)
    daemon -> worker  ("shm", input segment name, output segment name, input slot bytes, output slot bytes)
    worker -> daemon  ("attached",)
    daemon -> worker  ("run", seq, shape, dtype str, slot)  ...  ("close",)
    worker -> daemon  ("ok", seq, shape, dtype str) | ("error", seq, module, type name, message)

Errors the daemon should see typed are sent with the names of ``segd.errors`` classes.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import mmap
import os
import re
import signal
import sys
from importlib import metadata
from typing import Any

import numpy as np

#: runtime name -> (module holding Interpreter/load_delegate, distribution name for the version).
#: Dict order is the CPU preference (ai-edge-litert is 10-20x faster on the CPU).
RUNTIMES: dict[str, tuple[str, str]] = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite_runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
}
#: The order the Edge TPU worker tries runtimes in: tflite_runtime is what libedgetpu builds are
#: paired with (see segd/data/edgetpu_pairings.toml); ai-edge-litert only where a pairing says so.
TPU_PREFERENCE = ("tflite_runtime", "litert")

DEFAULT_LIBRARY = "libedgetpu.so.1"
CUSTOM_OP = "edgetpu-custom-op"
#: The known-good libedgetpu (the "recommended" pair of segd/data/edgetpu_pairings.toml).
INSTALL_HINT = ("install libedgetpu1-max 16.0tf2.17.1-1 from github.com/feranick/libedgetpu releases "
                "(`segd doctor` prints the commands for the known-good pair)")
ERRORS_MODULE = "segd.errors"

# enum edgetpu_device_type in edgetpu_c.h
_DEVICE_TYPES = {0: "pci", 1: "usb"}
# What libedgetpu's plugin accepts as its "device" option.
DEVICE_OPTION = re.compile(r"^(?:(usb|pci)(?::(\d+))?|:(\d+)|)$")


class WorkerError(Exception):
    """A failure the daemon maps to the ``segd.errors`` class named by ``kind``."""

    kind = "RuntimeUnavailable"


class Unavailable(WorkerError):
    kind = "RuntimeUnavailable"


class ModelRefused(WorkerError):
    kind = "ModelError"


# --- runtimes -----------------------------------------------------------------------------------
def runtime_versions() -> dict[str, str | None]:
    """Installed runtimes and their versions (None: not installed), without importing them:
    two TFLite runtimes in one process is what this worker exists to avoid."""
    found: dict[str, str | None] = {}
    for name, (module, dist) in RUNTIMES.items():
        try:
            spec = importlib.util.find_spec(module.partition(".")[0])
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            found[name] = None
            continue
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def import_runtime(name: str) -> Any:
    if name not in RUNTIMES:
        raise Unavailable(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    try:
        return importlib.import_module(RUNTIMES[name][0])
    except ImportError as exc:  # e.g. a tflite_runtime built for numpy 1.x under numpy 2
        raise Unavailable(
            f"{RUNTIMES[name][1]} cannot be imported by {sys.executable} "
            f"(numpy {np.__version__}): {exc}"
        ) from exc


def runtime_label(name: str) -> str:
    dist = RUNTIMES[name][1]
    try:
        return f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


# --- libedgetpu's C API (tflite/public/edgetpu_c.h) ------------------------------------------------
class _CDevice(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("path", ctypes.c_char_p)]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]  # fmt: skip


def load_library(library: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(library)
    except OSError as exc:
        raise Unavailable(f"libedgetpu not installed ({exc}) — {INSTALL_HINT}") from exc


def symbol(handle: ctypes.CDLL, library: str, name: str) -> Any:
    try:
        return getattr(handle, name)
    except AttributeError as exc:
        raise Unavailable(f"{library} is not libedgetpu (it has no {name})") from exc


def list_devices(library: str) -> list[tuple[str, str]]:
    """(type, path) of the Edge TPUs libedgetpu enumerates, in its order."""
    handle = load_library(library)
    list_fn = symbol(handle, library, "edgetpu_list_devices")
    free_fn = symbol(handle, library, "edgetpu_free_devices")
    list_fn.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
    list_fn.restype = ctypes.POINTER(_CDevice)
    free_fn.argtypes = [ctypes.POINTER(_CDevice)]
    free_fn.restype = None
    count = ctypes.c_size_t(0)
    array = list_fn(ctypes.byref(count))
    try:
        devices = []
        for i in range(count.value if array else 0):
            raw = array[i]
            path = raw.path.decode("utf-8", "replace") if raw.path else ""
            devices.append((_DEVICE_TYPES.get(raw.type, f"type{raw.type}"), path))
        return devices
    finally:
        if array:
            free_fn(array)


def edgetpu_version(library: str) -> str | None:
    """``edgetpu_version()``: "BuildLabel(...), RuntimeVersion(N)"; None if not libedgetpu."""
    handle = load_library(library)
    try:
        fn = symbol(handle, library, "edgetpu_version")
    except Unavailable:
        return None
    fn.argtypes = []
    fn.restype = ctypes.c_char_p
    raw = fn()
    return raw.decode("utf-8", "replace") if raw else None


def library_file(library: str) -> str | None:
    """The file the dynamic loader actually opened for ``library`` (a soname resolves to
    e.g. /usr/lib/aarch64-linux-gnu/libedgetpu.so.1.0), from dladdr() on its version symbol."""
    handle = load_library(library)
    try:
        fn = symbol(handle, library, "edgetpu_version")
        dladdr = ctypes.CDLL(None).dladdr
    except (Unavailable, AttributeError):
        return os.path.realpath(library) if os.path.exists(library) else None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))


def select_device(option: str, devices: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The device libedgetpu's plugin picks for a ``device`` option (same rules as the plugin)."""
    match = DEVICE_OPTION.match(option)
    if not match:
        return None
    kind, nth_of_kind, nth = match.groups()
    if nth is not None:
        index = int(nth)
        return devices[index] if index < len(devices) else None
    candidates = [d for d in devices if kind is None or d[0] == kind]
    index = int(nth_of_kind or 0)
    return candidates[index] if index < len(candidates) else None


def device_option(device: str | None, devices: list[tuple[str, str]]) -> str:
    """The plugin's ``device`` option: its own forms pass through, a device path becomes ':N'."""
    if device is None:
        return ""
    if DEVICE_OPTION.match(device):
        return device
    for index, (_, path) in enumerate(devices):
        if path == device:
            return f":{index}"
    listed = ", ".join(f"{t} {p}" for t, p in devices) or "none"
    raise Unavailable(
        f"no Edge TPU at {device!r} (libedgetpu lists: {listed}); use a listed path or "
        "'usb', 'usb:N', 'pci', 'pci:N', ':N'"
    )


def short_version(version: str | None) -> str:
    match = re.search(r"RuntimeVersion\((\d+)\)", version or "")
    if match:
        return f"runtime version {match.group(1)}"
    return version or "of unknown version"


# --- the interpreter ------------------------------------------------------------------------------
def open_interpreter(
    model: bytes, *, library: str, runtime: str, device: str | None, num_threads: int | None
) -> tuple[Any, str, str]:
    """(allocated interpreter with the Edge TPU delegate, runtime label, device). Every failure
    is an Unavailable (or ModelRefused) that says why. The caller has already checked that this
    libedgetpu and this runtime are a known pair."""
    module = import_runtime(runtime)
    label = runtime_label(runtime)
    devices = list_devices(library)
    option = device_option(device, devices)
    shown = option or "(any)"
    try:
        delegate = module.load_delegate(library, {"device": option} if device is not None else {})
    except OSError as exc:
        raise Unavailable(f"libedgetpu not installed ({exc}) — {INSTALL_HINT}") from exc
    except AttributeError as exc:
        raise Unavailable(f"{library} is not a TFLite delegate plugin ({exc})") from exc
    except ValueError as exc:
        # load_delegate: "Failed to load delegate from <lib>\n<what the plugin reported>"
        message = str(exc).partition("\n")[2].strip()
        if message:
            raise Unavailable(f"Edge TPU delegate creation failed on device {shown}: {message}") from exc
        if not devices:
            version = edgetpu_version(library)
            raise Unavailable(
                f"no Edge TPU found (libedgetpu {short_version(version)} sees no USB or PCIe device)"
            ) from exc
        listed = ", ".join(f"{t} {p}" for t, p in devices)
        raise Unavailable(
            f"libedgetpu could not open device {shown} (no Edge TPU attached?); libedgetpu lists {listed}"
        ) from exc
    try:
        interp = module.Interpreter(
            model_content=model,
            num_threads=num_threads or os.cpu_count() or 1,
            experimental_delegates=[delegate],
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        if CUSTOM_OP in str(exc):
            raise Unavailable(
                f"the Edge TPU delegate from {library} did not take the model's {CUSTOM_OP} ops "
                f"(unresolved custom op '{CUSTOM_OP}'): runtime refused the model: {exc}"
            ) from exc
        raise Unavailable(f"the model failed with the Edge TPU delegate ({label}): {exc}") from exc
    picked = select_device(option, devices)
    return interp, label, picked[1] if picked else shown


def _spec(details: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = details.get("quantization", (0.0, 0))
    return {
        "name": str(details["name"]),
        "index": int(details["index"]),
        "shape": [int(x) for x in details["shape"]],
        "dtype": np.dtype(details["dtype"]).str,
        "quantization": (float(scale), int(zero_point)),
    }


class TpuRunner:
    """The worker's runner: one input, one output, batch dim added/removed like segd's."""

    backend = "edgetpu"

    def __init__(self, interpreter: Any, runtime: str, device: str) -> None:
        self._interp = interpreter
        self.runtime = runtime
        self.device = device
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelRefused(
                f"model has {len(inputs)} inputs and {len(outputs)} outputs; segd needs exactly one of each"
            )
        self.input, self.output = _spec(inputs[0]), _spec(outputs[0])

    def run(self, tensor: np.ndarray) -> np.ndarray:
        if tensor.ndim == len(self.input["shape"]) - 1:
            tensor = tensor[None]
        self._interp.set_tensor(self.input["index"], tensor)
        self._interp.invoke()
        out: np.ndarray = self._interp.get_tensor(self.output["index"])
        return out[0] if out.shape[0] == 1 else out

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "runtime": self.runtime, "device": self.device,
                "input": self.input, "output": self.output}  # fmt: skip

    def close(self) -> None:
        self._interp = None


# --- the protocol (worker side) -----------------------------------------------------------------------
def error_payload(exc: BaseException) -> tuple[str, str, str]:
    if isinstance(exc, WorkerError):
        return ERRORS_MODULE, exc.kind, str(exc)
    return type(exc).__module__, type(exc).__qualname__, str(exc)


class _Segment:
    """A POSIX shared-memory segment the daemon created, mapped by name (no resource tracker:
    the daemon owns and unlinks it)."""

    def __init__(self, name: str) -> None:
        fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.buf = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.buf.close()


def serve(conn: Any, runner: Any) -> None:
    """Attach the daemon's two segments, then answer run requests until told to stop (or the
    daemon is gone). ``runner`` has ``run(ndarray) -> ndarray`` and ``close()``. Each request
    names its slot: the daemon keeps up to its pipelining depth of requests here at once."""
    message = conn.recv()
    if message[0] != "shm":
        runner.close()
        return
    in_seg, out_seg = _Segment(message[1]), _Segment(message[2])
    in_size, out_size = message[3], message[4]  # bytes per slot
    conn.send(("attached",))
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break
            if message[0] != "run":
                break
            _, seq, shape, dtype, slot = message
            try:
                tensor = np.ndarray(shape, dtype=np.dtype(dtype), buffer=in_seg.buf, offset=slot * in_size)
                out = np.ascontiguousarray(runner.run(tensor))
                del tensor
                if out.nbytes > out_size:
                    raise RuntimeError(f"output of {out.nbytes} bytes exceeds the {out_size} reserved")
                view = np.ndarray(out.shape, dtype=out.dtype, buffer=out_seg.buf, offset=slot * out_size)
                view[...] = out
                del view
                conn.send(("ok", seq, tuple(out.shape), out.dtype.str))
            except Exception as exc:
                conn.send(("error", seq, *error_payload(exc)))
    finally:
        in_seg.close()
        out_seg.close()
        runner.close()


def hello() -> dict[str, Any]:
    return {
        "python": sys.executable,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "numpy": np.__version__,
        "runtimes": runtime_versions(),
    }


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    conn = Connection(int(argv[1]))
    try:
        conn.send(("hello", hello()))
        message = conn.recv()
        if message[0] != "start":
            return 0  # refused by the daemon: nothing was loaded
        options = message[1]
        try:
            interp, label, device = open_interpreter(
                options["model"], library=options["library"], runtime=options["runtime"],
                device=options["device"], num_threads=options["num_threads"],
            )  # fmt: skip
            runner = TpuRunner(interp, label, device)
        except BaseException as exc:
            conn.send(("error", *error_payload(exc)))
            return 0
        conn.send(("ready", runner.info()))
        serve(conn, runner)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the daemon is gone
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--hello"]:  # `segd doctor` asks what this Python has
        import json

        print(json.dumps(hello()))
        sys.exit(0)
    sys.exit(main(sys.argv))
