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
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from segd.child import (
    SHM_PREFIX,
    Child,
    backoff_delay,
    describe_exit,
    error_payload,
    new_segment,
    rebuild_error,
    start_child,
)
from segd.errors import RequestTimeout, RuntimeUnavailable, WorkerCrashed
from segd.runtime.base import Runner, TensorSpec

RunnerFactory = Callable[[], Runner]

@dataclass(frozen=True)
class EdgeTpuFactory:
    """Picklable recipe for the child: open the Edge TPU interpreter there, not here."""

    model_content: bytes
    device: str | None = None
    library: str | None = None
    runtime: str | None = None
    num_threads: int | None = None

    def __call__(self) -> Runner:
        from segd.runtime.edgetpu import open_edgetpu

        return open_edgetpu(
            self.model_content,
            device=self.device,
            library=self.library,
            runtime=self.runtime,
            num_threads=self.num_threads,
        )


def edgetpu_worker_factory(
    *, library: str | None = None, runtime: str | None = None, num_threads: int | None = None,
    **worker_options: Any,
) -> Callable[[bytes, str | None], WorkerRunner]:  # fmt: skip
    """A ``(model_bytes, device) -> Runner`` factory (what ``segd.engine.open_runner`` takes)
    that opens the Edge TPU interpreter inside a WorkerRunner."""
    from segd.runtime.edgetpu import library_path

    lib = library or library_path()

    def make(model_content: bytes, device: str | None) -> WorkerRunner:
        factory = EdgeTpuFactory(model_content, device, lib, runtime, num_threads)
        return WorkerRunner(factory, **worker_options)

    return make


# --- errors across the process boundary -----------------------------------------------------
def _child_main(conn: mpc.Connection) -> None:
    """Receive the factory, open the runner, report its specs, serve run requests until told
    to stop (or the parent is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        _, factory = conn.recv()
        runner = factory()
    except BaseException as exc:
        conn.send(("error", *error_payload(exc)))
        conn.close()
        return
    info = {
        "backend": runner.backend,
        "runtime": runner.runtime,
        "device": runner.device,
        "input": runner.input,
        "output": runner.output,
    }
    conn.send(("ready", info))
    message = conn.recv()
    in_shm = SharedMemory(name=message[1])
    out_shm = SharedMemory(name=message[2])
    in_size, out_size = message[3], message[4]  # bytes per slot
    conn.send(("attached",))
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break  # the parent is gone
            if message[0] != "run":
                break
            _, seq, shape, dtype, slot = message
            try:
                tensor = np.ndarray(shape, dtype=np.dtype(dtype), buffer=in_shm.buf, offset=slot * in_size)
                out = np.ascontiguousarray(runner.run(tensor))
                del tensor
                if out.nbytes > out_size:
                    raise RuntimeError(
                        f"output of {out.nbytes} bytes exceeds the {out_size} reserved"
                    )
                view = np.ndarray(out.shape, dtype=out.dtype, buffer=out_shm.buf, offset=slot * out_size)
                view[...] = out
                del view
                conn.send(("ok", seq, out.shape, out.dtype.str))
            except Exception as exc:
                conn.send(("error", seq, *error_payload(exc)))
    finally:
        in_shm.close()
        out_shm.close()
        runner.close()
        conn.close()


# --- the parent ---------------------------------------------------------------------------
class _Child(Child):
    """The Edge TPU child with its tensor slots and pipelined replies."""

    def __init__(self, proc: Any, conn: mpc.Connection) -> None:
        super().__init__(proc, conn)
        self.in_size = self.out_size = 0  # bytes per slot
        # Pipelining: free slots, replies read by one caller for another, who is reading.
        self.free_slots: list[int] = []
        self.in_flight = 0
        self._replies: dict[int, Any] = {}
        self._gone: tuple[str, Any] | None = None
        self._reading = False
        self._replied = threading.Condition()
        self.send_lock = threading.Lock()

    def reply(self, seq: int, timeout: float) -> tuple[str, Any]:
        """The child's answer to request ``seq`` (as :meth:`receive`). Answers come in request
        order; whichever caller reads the pipe files the others' answers for them."""
        deadline = time.monotonic() + timeout
        with self._replied:
            while True:
                if seq in self._replies:
                    return "msg", self._replies.pop(seq)
                if self._gone is not None:
                    return self._gone
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout", None
                if not self._reading:
                    self._reading = True
                    break
                self._replied.wait(remaining)
        kind: str = "timeout"
        message: Any = None
        try:
            kind, message = self.receive(remaining)
        except (OSError, ValueError):  # another caller tore the child down meanwhile
            kind, message = "dead", "stopped"
        finally:
            with self._replied:
                self._reading = False
                if kind == "msg" and message is not None:
                    self._replies[message[1]] = message
                elif kind == "dead":
                    self._gone = (kind, message)
                self._replied.notify_all()
        if kind == "timeout":
            return kind, message
        return self.reply(seq, max(deadline - time.monotonic(), 0.001))


class WorkerRunner:
    """Runner protocol over a child process; survives the child's crashes and hangs."""

    def __init__(
        self,
        factory: RunnerFactory,
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
        self.input: TensorSpec = info["input"]
        self.output: TensorSpec = info["output"]

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.proc.pid if child is not None else None

    def _spawn(self) -> _Child:
        """Start a child and wait until it serves; its start-up error is raised here, typed."""
        # The factory (model bytes included) goes through our socket, not the spawn pipe: a child
        # that dies while bootstrapping leaves a large spawn-pipe write blocked forever (CPython
        # keeps the pipe's read end open until the write ends). Pickled here, so an unpicklable
        # factory fails in the caller; sent from a thread, so a stuck child cannot block us.
        payload = ForkingPickler.dumps(("start", self._factory))
        child, sender = start_child(self._ctx, _child_main, payload, "segd-edgetpu-worker", _Child)
        try:
            kind, message = child.receive(self.start_timeout)
            if kind == "timeout":
                raise RuntimeUnavailable(
                    f"Edge TPU worker did not start within {self.start_timeout:g} s"
                )
            if kind == "dead":
                raise WorkerCrashed(f"Edge TPU worker died during start-up ({message})")
            if message[0] == "error":
                raise rebuild_error(*message[1:])
            info = message[1]
            child.info = info
            child.in_size, child.out_size = _nbytes(info["input"]), _nbytes(info["output"])
            child.in_shm = new_segment(child.in_size * self.depth)
            child.out_shm = new_segment(child.out_size * self.depth)
            child.free_slots = list(range(self.depth))
            child.conn.send(("shm", child.in_shm.name, child.out_shm.name, child.in_size, child.out_size))
            kind, message = child.receive(self.start_timeout)
            if kind != "msg" or message[0] != "attached":
                raise WorkerCrashed(f"Edge TPU worker failed attaching shared memory ({message})")
        except BaseException:
            child.stop()
            raise
        finally:
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
                "backend": self.backend,
                "runtime": self.runtime,
                "device": self.device,
                "input": self.input.describe(),
                "output": self.output.describe(),
                "isolation": "process",
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


def _nbytes(spec: TensorSpec) -> int:
    return max(1, int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize)


__all__ = [
    "SHM_PREFIX",
    "EdgeTpuFactory",
    "RunnerFactory",
    "WorkerRunner",
    "backoff_delay",
    "describe_exit",
    "edgetpu_worker_factory",
]
