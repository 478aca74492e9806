"""A Runner whose interpreter lives in a supervised child process.

libedgetpu aborts the process it runs in on a USB transfer error, and a wedged device can hang
``invoke`` forever; neither may take the HTTP server down (docs/ARCHITECTURE.md, invariant 3). So the Edge TPU
interpreter runs in a child started with the 'spawn' context (the parent has threads; fork would
copy their locks), tensors cross through two ``multiprocessing.shared_memory`` segments sized
from the TensorSpecs the child reports at start-up, and a Pipe carries small control messages.

When the child dies or overruns the per-call timeout, ``run`` raises ``WorkerCrashed`` /
``RequestTimeout`` and a supervisor thread starts a new child after an exponential backoff;
calls made meanwhile fail at once with "restarting, retry in N s" instead of blocking.

Pipelined: up to ``depth`` (2) requests are in the child at once, each in its own slot of the
shared segments. The child runs them one after the other, so the next input is already waiting
when an invoke ends and the device never idles while the parent wakes up, copies the previous
result out and sends the next one. ``run`` is thread-safe; ``parallelism`` says how many callers
it keeps busy.

The recipes, the spawned child's main loop and the parent's handle on one child are in
:mod:`segd.runtime.worker_child`; this module is the supervisor.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np

from segd.child import (
    SHM_PREFIX,
    backoff_delay,
    describe_exit,
    new_segment,
    rebuild_error,
    send_bytes,
    start_child,
)
from segd.errors import RequestTimeout, RuntimeUnavailable, WorkerCrashed
from segd.runtime import tpu_worker
from segd.runtime.base import Runner, TensorSpec, describe_runner
from segd.runtime.worker_child import (
    EdgeTpuFactory,
    EdgeTpuProgram,
    _Child,
    _child_main,
    _nbytes,
    _Program,
)

RunnerFactory = Callable[[], Runner]


def edgetpu_worker_factory(
    *, library: str | None = None, runtime: str | None = None, num_threads: int | None = None,
    python: str | None = None, pairing: str = "check", pairings: Path | None = None,
    dpkg_admindir: Path | None = None, **worker_options: Any,
) -> Callable[[bytes, str | None], WorkerRunner]:  # fmt: skip
    """A ``(model_bytes, device) -> Runner`` factory (what ``segd.engine.open_runner`` takes)
    that runs the Edge TPU interpreter in a WorkerRunner child under ``python``."""
    from segd.runtime.edgetpu import library_path

    lib = library or library_path()

    def make(model_content: bytes, device: str | None) -> WorkerRunner:
        program = EdgeTpuProgram(model_content, device, lib, python, runtime, num_threads,
                                 pairing, pairings, dpkg_admindir)  # fmt: skip
        return WorkerRunner(program, **worker_options)

    return make


class WorkerRunner:
    """Runner protocol over a child process; survives the child's crashes and hangs."""

    def __init__(
        self,
        factory: RunnerFactory | EdgeTpuProgram,
        *,
        call_timeout: float = 30.0,
        start_timeout: float = 120.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        context: str = "spawn",
        depth: int = 2,
    ) -> None:
        if context == "fork":
            raise ValueError("fork would copy the parent's threads' locks; use spawn or forkserver")
        self._factory = factory
        self._ctx = mp.get_context(context)
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.depth = max(1, depth)
        self.parallelism = self.depth  # callers run() keeps busy at once
        self.thread_safe = True
        self._run_slots = threading.BoundedSemaphore(self.depth)  # requests in the child
        self._state_lock = threading.Lock()  # state, counters, current child
        self._wake = threading.Event()  # set on close(): stops a pending restart
        self._seq = itertools.count(1)
        self._supervisor: threading.Thread | None = None
        self.state = "starting"
        self.restarts = 0
        self.crashes = 0
        self.last_crash: str | None = None
        self._failures = 0  # crashes / failed restarts since the last good request
        self._restart_at = 0.0
        self._closed = False
        self._child: _Child | None = self._spawn()
        self._adopt(self._child.info)
        self.state = "ready"

    # -- Runner attributes from the child's report --
    def _adopt(self, info: dict[str, Any]) -> None:
        self.backend: str = info["backend"]
        self.runtime: str = info["runtime"]
        self.device: str | None = info["device"]
        self.input: TensorSpec = TensorSpec.from_details(info["input"])
        self.output: TensorSpec = TensorSpec.from_details(info["output"])
        self.pairing: dict[str, Any] | None = info.get("pairing")
        self.python: dict[str, Any] | None = info.get("python")

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.proc.pid if child is not None else None

    def _spawn(self) -> _Child:
        """Start a child and wait until it serves; its start-up error is raised here, typed."""
        if isinstance(self._factory, EdgeTpuProgram):
            return self._spawn_program(self._factory)
        # The factory (model bytes included) is pickled here, so an unpicklable factory fails in
        # the caller; start_child sends it through our socket from a thread (why: its docstring).
        payload = ForkingPickler.dumps(("start", self._factory))
        child, sender = start_child(self._ctx, _child_main, payload, "segd-edgetpu-worker", _Child)
        with child.starting(sender):
            self._attach(child, self._started(child))
        return child

    def _started(self, child: _Child) -> dict[str, Any]:
        """The child's start-up report (its interpreter's details); its failure, typed."""
        kind, message = child.receive(self.start_timeout)
        if kind == "timeout":
            raise RuntimeUnavailable(f"Edge TPU worker did not start within {self.start_timeout:g} s")
        if kind == "dead":
            raise WorkerCrashed(f"Edge TPU worker died during start-up ({message})")
        if message[0] == "error":
            raise rebuild_error(*message[1:])
        return dict(message[1])

    def _attach(self, child: _Child, info: dict[str, Any]) -> None:
        """Create the two segments (``depth`` slots each, sized from the child's report), and
        wait for the child to map them."""
        child.info = info
        child.in_size = _nbytes(TensorSpec.from_details(info["input"]))
        child.out_size = _nbytes(TensorSpec.from_details(info["output"]))
        child.in_shm = new_segment(child.in_size * self.depth)
        child.out_shm = new_segment(child.out_size * self.depth)
        child.free_slots = list(range(self.depth))
        child.conn.send(("shm", child.in_shm.name, child.out_shm.name, child.in_size, child.out_size))
        kind, message = child.receive(self.start_timeout)
        if kind != "msg" or message[0] != "attached":
            raise WorkerCrashed(f"Edge TPU worker failed attaching shared memory ({message})")

    def _spawn_program(self, program: EdgeTpuProgram) -> _Child:
        """Run tpu_worker.py under ``program.python``; hear which runtimes it has, check the
        pairing, and only then let it load the delegate (a refused pairing never loads it)."""
        from segd.runtime import edgetpu

        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(  # -I: no PYTHONPATH, no user site, not the script's dir
                [program.executable, "-I", tpu_worker.__file__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise RuntimeUnavailable(f"cannot start the Edge TPU worker with {program.executable}: {exc}") from exc
        finally:
            theirs.close()
        conn = mpc.Connection(ours.detach())
        child = _Child(_Program(proc), conn)
        sender: threading.Thread | None = None
        try:
            kind, message = child.receive(self.start_timeout)
            if kind == "timeout":
                raise RuntimeUnavailable(f"Edge TPU worker did not start within {self.start_timeout:g} s")
            if kind == "dead" or message[0] != "hello":
                raise WorkerCrashed(f"Edge TPU worker ({program.executable}) died during start-up ({message})")
            env = message[1]
            decision = edgetpu.check_pairing(
                env["runtimes"], library=program.library, policy=program.pairing,
                pairings=program.pairings, preferred=program.runtime,
                **({"admindir": program.dpkg_admindir} if program.dpkg_admindir else {}),
            )  # fmt: skip
            options = {"model": program.model_content, "library": program.library or edgetpu.library_path(),
                       "runtime": decision.runtime, "device": program.device,
                       "num_threads": program.num_threads}  # fmt: skip
            payload = ForkingPickler.dumps(("start", options))
            sender = threading.Thread(target=send_bytes, args=(conn, payload), daemon=True)
            sender.start()
            info = self._started(child)
            info["pairing"] = decision.describe()
            info["python"] = {"executable": env["python"], "version": env["python_version"], "numpy": env["numpy"]}
            self._attach(child, info)
        except BaseException:
            child.stop(graceful=1.0)  # says "close" first
            raise
        finally:
            if sender is not None:
                sender.join(5.0)
        return child

    # -- failure handling and restarts --
    def _fail(self, child: _Child, reason: str) -> float:
        """Record a crash of ``child``, tear it down, schedule a restart; return the delay."""
        with self._state_lock:
            if self._child is not child:  # a pipelined caller already handled this child
                return max(self._restart_at - time.monotonic(), 0.0)
            self._child = None
            self.state = "restarting"
        child.stop()
        with self._state_lock:
            self.crashes += 1
            self.last_crash = f"{reason} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
            return self._schedule_restart_locked()

    def _schedule_restart_locked(self) -> float:
        self._failures += 1
        delay = backoff_delay(self._failures, self.backoff_base, self.backoff_max)
        if self._closed:
            return delay
        self.state = "restarting"
        self._restart_at = time.monotonic() + delay
        self._supervisor = threading.Thread(
            target=self._restart_after, args=(delay,), name="segd-edgetpu-supervisor", daemon=True
        )
        self._supervisor.start()
        return delay

    def _restart_after(self, delay: float) -> None:
        if self._wake.wait(delay):
            return  # closed
        with self._state_lock:
            if self._closed:
                return
            self.restarts += 1
            self.state = "starting"
        try:
            child = self._spawn()
        except Exception as exc:
            with self._state_lock:
                self.last_crash = f"restart failed: {exc}"
                self._schedule_restart_locked()
            return
        with self._state_lock:
            if not self._closed:
                self._child = child
                self._adopt(child.info)
                self.state = "ready"
                return
        child.stop(graceful=2.0)

    def retry_after(self) -> float:
        """Seconds until the worker should be serving again (0 when it is)."""
        with self._state_lock:
            if self.state == "ready":
                return 0.0
            return max(self._restart_at - time.monotonic(), 0.0)

    # -- Runner protocol --
    def run(self, tensor: np.ndarray) -> np.ndarray:
        """Run in the child. Raises WorkerCrashed / RequestTimeout and never blocks beyond the
        call timeout (once more for each request ahead of it in the child); errors the runner
        raises in the child come back as the same type. Thread-safe."""
        with self._run_slots:
            with self._state_lock:
                child = self._child
                if self._closed:
                    raise WorkerCrashed("Edge TPU worker is closed")
                if child is None or self.state != "ready":
                    wait = max(self._restart_at - time.monotonic(), 0.0)
                    raise WorkerCrashed(
                        f"Edge TPU worker {self.state} after: {self.last_crash}; "
                        f"retry in {max(1, math.ceil(wait))} s"
                    )
                slot = child.free_slots.pop()
                ahead = child.in_flight
                child.in_flight += 1
            try:
                return self._run_in(child, tensor, slot, ahead)
            finally:
                with self._state_lock:
                    child.in_flight -= 1
                    child.free_slots.append(slot)

    def _run_in(self, child: _Child, tensor: np.ndarray, slot: int = 0, ahead: int = 0) -> np.ndarray:
        assert child.in_shm is not None and child.out_shm is not None
        arr = np.ascontiguousarray(tensor)
        if arr.dtype != self.input.dtype:
            raise ValueError(
                f"input dtype {arr.dtype} does not match the model's {self.input.dtype}"
            )
        if arr.nbytes > child.in_size:
            raise ValueError(
                f"input of shape {arr.shape} does not fit the model input {self.input.shape}"
            )
        in_buf, out_buf = child.in_shm.buf, child.out_shm.buf
        assert in_buf is not None and out_buf is not None
        start = slot * child.in_size
        in_buf[start : start + arr.nbytes] = arr.reshape(-1).view(np.uint8).data
        with child.send_lock:  # sequence numbers in the order the child receives them
            seq = next(self._seq)
            with contextlib.suppress(OSError, ValueError):  # if the child is gone, reply() says how
                child.conn.send(("run", seq, arr.shape, arr.dtype.str, slot))
        # the requests ahead of this one in the child run first
        kind, message = child.reply(seq, self.call_timeout * (1 + ahead))
        if kind == "timeout":
            delay = self._fail(child, f"no answer within {self.call_timeout:g} s (killed)")
            raise RequestTimeout(
                f"Edge TPU did not answer within {self.call_timeout:g} s; worker killed, "
                f"restarting in {delay:.1f} s"
            )
        if kind == "dead":
            delay = self._fail(child, f"worker {message} during a request")
            raise WorkerCrashed(
                f"Edge TPU worker {message} during the request; restarting in {delay:.1f} s"
            )
        if message[0] == "error":
            raise rebuild_error(*message[2:])
        _, _, shape, dtype = message
        count = int(np.prod(shape, dtype=np.int64))
        flat = np.frombuffer(out_buf, dtype=np.dtype(dtype), count=count, offset=slot * child.out_size)
        out = flat.reshape(shape).copy()
        del flat
        with self._state_lock:
            self._failures = 0
        return out

    def describe(self) -> dict[str, Any]:
        with self._state_lock:
            return {
                **describe_runner(self),
                "isolation": "process",
                "python": self.python,
                "pairing": self.pairing,
                "pid": self.pid,
                "state": self.state,
                "restarts": self.restarts,
                "crashes": self.crashes,
                "last_crash": self.last_crash,
                "retry_in": round(max(self._restart_at - time.monotonic(), 0.0), 3)
                if self.state != "ready"
                else 0.0,
            }

    def close(self) -> None:
        """Stop the child (after the request in flight, if any) and free its shared memory."""
        deadline = time.monotonic() + self.call_timeout * self.depth + 5.0
        acquired = 0
        while acquired < self.depth and self._run_slots.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            acquired += 1
        try:
            with self._state_lock:
                self._closed = True
                self.state = "closed"
                child, self._child = self._child, None
                supervisor = self._supervisor
            self._wake.set()
            if child is not None:
                child.stop(graceful=5.0)
            if supervisor is not None and supervisor is not threading.current_thread():
                supervisor.join(self.start_timeout + 10.0)
        finally:
            for _ in range(acquired):
                self._run_slots.release()

    def __enter__(self) -> WorkerRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "SHM_PREFIX",
    "EdgeTpuFactory",
    "EdgeTpuProgram",
    "RunnerFactory",
    "WorkerRunner",
    "backoff_delay",
    "describe_exit",
    "edgetpu_worker_factory",
]
