"""The Edge TPU worker's child side and the parent's handle on one child: the picklable
recipes (:class:`EdgeTpuFactory` runs the interpreter in a 'spawn' child,
:class:`EdgeTpuProgram` runs :mod:`segd.runtime.tpu_worker` under any Python), the spawned
child's main loop, and ``_Child``, which files the pipelined replies. Split from
:mod:`segd.runtime.worker` (the supervisor, :class:`WorkerRunner`), which re-exports the recipes.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segd.child import (
    Child,
    error_payload,
)
from segd.runtime import tpu_worker
from segd.runtime.base import Runner, TensorSpec


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


@dataclass(frozen=True)
class EdgeTpuProgram:
    """Recipe for a worker that runs :mod:`segd.runtime.tpu_worker` as a program under
    ``python`` (any Python with numpy and a TFLite runtime; segd need not be installed there).
    Before the delegate is loaded, the daemon checks the libedgetpu/runtime pairing against
    the runtimes that Python reports (:func:`segd.runtime.edgetpu.check_pairing`)."""

    model_content: bytes
    device: str | None = None
    library: str | None = None
    python: str | None = None  # default: the daemon's own interpreter
    runtime: str | None = None  # preferred runtime (used by edgetpu_pairing = "trust")
    num_threads: int | None = None
    pairing: str = "check"
    pairings: Path | None = None  # extra pairings table
    dpkg_admindir: Path | None = None

    @property
    def executable(self) -> str:
        return self.python or sys.executable


# --- errors across the process boundary -----------------------------------------------------
def _wire_spec(spec: TensorSpec) -> dict[str, Any]:
    """A TensorSpec as the plain dict the worker protocol carries (what tpu_worker sends)."""
    return {"name": spec.name, "index": spec.index, "shape": list(spec.shape),
            "dtype": spec.dtype.str, "quantization": (spec.scale, spec.zero_point)}  # fmt: skip


def _child_main(conn: mpc.Connection) -> None:
    """Receive the factory, open the runner, report its specs, then serve run requests with
    the same loop as the tpu_worker program until told to stop (or the parent is gone)."""
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
        "input": _wire_spec(runner.input),
        "output": _wire_spec(runner.output),
    }
    conn.send(("ready", info))
    try:
        tpu_worker.serve(conn, runner)
    except (EOFError, OSError):
        pass  # the parent is gone
    finally:
        conn.close()


# --- the parent ---------------------------------------------------------------------------
class _Program:
    """A ``subprocess.Popen`` with the parts of ``multiprocessing.Process`` _Child uses; its
    sentinel is a pidfd, readable once the process has exited."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.sentinel = os.pidfd_open(proc.pid)

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll()

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.sentinel)


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


def _nbytes(spec: TensorSpec) -> int:
    return max(1, int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize)
