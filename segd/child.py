"""Supervised child processes: what the Edge TPU worker (segd.runtime.worker) and the image
decode workers (segd.decode_worker) share.

A native library that aborts or segfaults must cost one request, not the daemon. So such code
runs in a child started with the 'spawn' context (the parent has threads; fork would copy their
locks), small control messages cross a Pipe, bulk data crosses named shared-memory segments,
and the parent notices a dead child from its process sentinel.
"""

from __future__ import annotations

import builtins
import contextlib
import mmap
import multiprocessing.connection as mpc
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from multiprocessing.shared_memory import SharedMemory
from typing import Any, TypeVar

from segd import errors

SHM_PREFIX = "segd_"
C = TypeVar("C", bound="Child")
_SHM_DIR = "/dev/shm"  # where Linux's shm_open puts its files (POSIX shared memory)


def backoff_delay(failures: int, base: float, maximum: float) -> float:
    """Seconds to wait before restart number ``failures`` (1, 2, ...) in a row: base * 2^(n-1)."""
    if failures <= 0:
        return 0.0
    return float(min(maximum, base * 2.0 ** min(failures - 1, 62)))


def describe_exit(exitcode: int | None) -> str:
    """'killed by SIGABRT', 'exited with code 3', ... for a child's exit code."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# --- errors across the process boundary -----------------------------------------------------
def error_payload(exc: BaseException) -> tuple[str, str, str]:
    return type(exc).__module__, type(exc).__qualname__, str(exc)


def rebuild_error(module: str, qualname: str, message: str) -> Exception:
    """The child's exception as the same type when it is one of ours or a builtin."""
    cls: Any = None
    if module == errors.__name__:
        cls = getattr(errors, qualname, None)
    elif module == "builtins":
        cls = getattr(builtins, qualname, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            rebuilt: Exception = cls(message)
            return rebuilt
        except Exception:
            pass  # a constructor with other arguments: fall back to a generic error
    return RuntimeError(f"{qualname}: {message}")


# --- one child ------------------------------------------------------------------------------
class Child:
    """One child process and its resources (owned by the parent)."""

    def __init__(self, proc: Any, conn: mpc.Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.in_shm: SharedMemory | None = None
        self.out_shm: SharedMemory | None = None
        self.info: dict[str, Any] = {}

    def receive(self, timeout: float) -> tuple[str, Any]:
        """('msg', message) | ('dead', exit description) | ('timeout', None)."""
        ready = mpc.wait([self.conn, self.proc.sentinel], timeout)
        if self.conn in ready:
            try:
                return "msg", self.conn.recv()
            except (EOFError, OSError):
                pass
        elif not ready:
            return "timeout", None
        self.proc.join(5)
        return "dead", describe_exit(self.proc.exitcode)

    @contextlib.contextmanager
    def starting(self, sender: threading.Thread) -> Iterator[None]:
        """Around the start-up handshake: any failure in it stops the child; the thread sending
        the start payload (:func:`start_child`) is joined either way."""
        try:
            yield
        except BaseException:
            self.stop()
            raise
        finally:
            sender.join(5.0)

    def stop(self, graceful: float = 0.0) -> None:
        """End the process (politely first when ``graceful``), reap it, free the segments."""
        if graceful and self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(("close",))
            self.proc.join(graceful)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.proc.close()
        self.conn.close()
        for shm in (self.in_shm, self.out_shm):
            if shm is not None:
                shm.close()
                with contextlib.suppress(FileNotFoundError):
                    shm.unlink()
        self.in_shm = self.out_shm = None


def start_child(
    ctx: BaseContext, target: Any, payload: bytes | memoryview, name: str, kind: type[C] = Child  # type: ignore[assignment]
) -> tuple[C, threading.Thread]:
    """Start ``target(conn)`` in a new process and send it ``payload`` (pickled bytes); the
    parent's handle is a ``kind`` (a :class:`Child` subclass may add per-use state).

    The payload goes through our socket, not the spawn pipe: a child that dies while
    bootstrapping leaves a large spawn-pipe write blocked forever (CPython keeps the pipe's read
    end open until the write ends). It is sent from a thread (returned, to be joined), so a
    stuck child cannot block the caller.
    """
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=target, args=(child_conn,), name=name, daemon=True)  # type: ignore[attr-defined]
    proc.start()
    child_conn.close()  # so the parent sees EOF when the child dies
    sender = threading.Thread(target=send_bytes, args=(parent_conn, payload), daemon=True)
    sender.start()
    return kind(proc, parent_conn), sender


def send_bytes(conn: mpc.Connection, payload: Any) -> None:
    with contextlib.suppress(OSError, ValueError):  # the child died: receive() reports it
        conn.send_bytes(payload)


# --- shared memory ----------------------------------------------------------------------------
def segment_name() -> str:
    """A fresh segment name that says which process made it (tests look for leftovers)."""
    return f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"


def new_segment(size: int) -> SharedMemory:
    """A fixed segment that lives as long as its child (the Edge TPU worker's tensors)."""
    return SharedMemory(name=segment_name(), create=True, size=size)


def create_mapping(size: int) -> tuple[str, mmap.mmap]:
    """A per-request segment: its name (for the child) and the parent's mapping of it.

    A plain mmap, not ``SharedMemory``: an array made on it keeps the mapping alive for as long
    as the array lives, and the mapping goes with the last reference (SharedMemory refuses to
    close while arrays point into it). Remove the name with :func:`remove_segment` once the
    child has answered; the pages stay until the mapping is gone.
    """
    name = segment_name()
    fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, max(1, size))
        return name, mmap.mmap(fd, max(1, size))
    finally:
        os.close(fd)


def open_mapping(name: str) -> mmap.mmap:
    """The child's mapping of a segment made by :func:`create_mapping`."""
    if os.sep in name or not name.startswith(SHM_PREFIX):
        raise ValueError(f"not a segd segment name: {name!r}")
    fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def remove_segment(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_SHM_DIR, name))


__all__ = [
    "SHM_PREFIX",
    "Child",
    "backoff_delay",
    "create_mapping",
    "describe_exit",
    "error_payload",
    "new_segment",
    "open_mapping",
    "rebuild_error",
    "remove_segment",
    "segment_name",
    "send_bytes",
    "start_child",
]
