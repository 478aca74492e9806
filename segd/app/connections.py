"""Connection-level defences: the one module that knows uvicorn's HTTP/1.1 protocol class.

uvicorn has no deadline for a request's head or body and counts *connections* in
``limit_concurrency``, so a client that opens sockets and sends nothing (or trickles bytes)
could hold every slot. segd does not use ``limit_concurrency``; instead this protocol

- gives each request's head ``header_timeout`` s (from the connection, or from the first byte
  of the next request on a kept-alive connection) and its body ``body_timeout`` s, and drops an
  upload that is slower than ``min_upload_rate`` bytes/s once ``header_timeout`` s have passed
  (408 + JSON, connection closed);
- caps open connections at ``max_connections``: a new connection over the cap closes the
  connection that has waited longest for its request head (503 + JSON), so idle sockets can
  never lock out clients that send requests; with nothing idle to close the new one is refused;
- drops a client that stops reading its response for ``body_timeout`` s;
- answers malformed HTTP (400) and oversized heads (431) with the daemon's JSON error body,
  never echoing what the client sent (a header line may hold an API key);
- logs refusals at most once per ``REFUSAL_LOG_INTERVAL`` s, with counts.

The seam: it subclasses ``uvicorn.protocols.http.h11_impl.H11Protocol`` (uvicorn's ``--http
h11`` class, passed as ``Config(http=...)``) and uses only its asyncio protocol callbacks,
``send_400_response``, and the attributes ``conn`` (the ``h11.Connection``, whose states are h11's
public API), ``transport`` and ``loop``. ``check_uvicorn()`` asserts these exist at start-up
and ``tests/test_connections.py`` runs against the uvicorn versions pinned in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import resource
import signal
import time
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from segd.errors import error_body

log = logging.getLogger("segd")

REFUSAL_LOG_INTERVAL = 10.0
CHECK_INTERVAL = 1.0  # seconds between checks of an upload's rate


def raw_json_response(status: int, code: str, detail: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 error response with the daemon's JSON error body, for the answers the
    protocol layer gives itself (before or instead of the application)."""
    body = json.dumps(error_body(code, detail)).encode()
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode(), b"content-type: application/json",
            f"content-length: {len(body)}".encode(), b"connection: close"]  # fmt: skip
    head += [f"{k}: {v}".encode() for k, v in extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class RefusalLog:
    """Counts refusals by reason and logs the first at once, then one line per interval with the
    counts since the last line: a flood of refused connections writes a line every 10 s, not a
    line per refusal."""

    def __init__(self, logger: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self.counts: dict[str, int] = {}
        self.last = -float("inf")
        self._later: asyncio.TimerHandle | None = None

    def note(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.flush(now)
        elif self._later is None:  # the rest of this interval's count is logged when it ends
            with contextlib.suppress(RuntimeError):  # no running loop (called outside the server)
                loop = asyncio.get_running_loop()
                self._later = loop.call_later(self.last + self.interval - now, self.flush)

    def flush(self, now: float | None = None) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if not self.counts:
            return
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        since = "" if self.last == -float("inf") else f" in the last {(now or time.monotonic()) - self.last:.1f} s"
        self.logger.warning("refused connections%s: %s", since, parts)
        self.counts.clear()
        self.last = now if now is not None else time.monotonic()


class QuietInvalidRequests(logging.Filter):
    """uvicorn logs "Invalid HTTP request received." per malformed request; the protocol below
    counts those in the refusal log instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus client deadlines, a connection cap that closes idle
    connections first, and JSON protocol errors (see the module docstring)."""

    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 60.0
    min_upload_rate: ClassVar[float] = 1024.0  # bytes/s; 0 turns the check off
    max_connections: ClassVar[int] = 512
    retry_after: ClassVar[int] = 1  # seconds, the daemon's retry_after setting
    live: ClassVar[dict[GuardedH11Protocol, None]]  # open connections, oldest first (per server)
    refusals: ClassVar[RefusalLog]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._guard: asyncio.TimerHandle | None = None
        self._write_guard: asyncio.TimerHandle | None = None
        self._phase = "headers"  # headers | body | busy (request complete, answer pending)
        self._since = time.monotonic()
        self._body_bytes = 0
        super().connection_made(transport)
        self.live[self] = None
        self._arm("headers")
        if len(self.live) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.pop(self, None)
        self._cancel()
        if self._write_guard is not None:
            self._write_guard.cancel()
            self._write_guard = None
        super().connection_lost(exc)

    # --- the connection cap ---------------------------------------------------------------
    def _make_room(self) -> None:
        """Over the cap: close the connection that has waited longest for a request head (it
        costs the others nothing to lose it), else refuse this one."""
        idle = [c for c in self.live if c is not self and c._waiting_for_head() and not c.transport.is_closing()]
        victim = min(idle, key=lambda c: c._since) if idle else self
        reason = "idle connections closed (connection cap)" if victim is not self else "connections over the cap"
        self.refusals.note(reason)
        victim._close_with(503, "overloaded", "too many open connections; this idle one is closed, retry later",
                           (("retry-after", str(self.retry_after)),))  # fmt: skip

    def _waiting_for_head(self) -> bool:
        return self._phase == "headers" and self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

    def _close_with(self, status: int, code: str, detail: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self._cancel()
        self.live.pop(self, None)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing of an answer sent yet
            self.transport.write(raw_json_response(status, code, detail, extra))
        self.transport.close()  # uvicorn's connection_lost then tells the application

    # --- deadlines --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._guard is None and self.conn.their_state is h11.IDLE:
            self._arm("headers")  # first bytes of the next request on a kept-alive connection
        if self._phase == "body":
            self._body_bytes += len(data)
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "headers":  # the head arrived, a body follows
            self._arm("body")
            self._body_bytes = len(data)  # about what came with the head
        elif state in (h11.DONE, h11.MUST_CLOSE) and self._phase in ("headers", "body"):
            # The request is complete. If the answer went out before it (e.g. 401 without reading
            # the upload) the connection is idle now: the next request's head must come in time.
            if self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
                self._arm("headers")
            else:
                self._cancel()
                self._phase = "busy"

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._phase = "headers"  # kept alive; uvicorn's keep-alive timeout closes it if quiet
            self._since = time.monotonic()

    def _arm(self, phase: str) -> None:
        self._cancel()
        self._phase = phase
        self._since = time.monotonic()
        self._body_bytes = 0
        delay = self.header_timeout if phase == "headers" else min(CHECK_INTERVAL, self.body_timeout)
        self._guard = self.loop.call_later(delay, self._check)

    def _cancel(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _check(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        elapsed = time.monotonic() - self._since
        if self._phase == "headers":
            detail = f"request headers not received within {self.header_timeout:g} s; closing the connection"
        elif elapsed >= self.body_timeout:
            detail = f"request body not received within {self.body_timeout:g} s; closing the connection"
        elif self.min_upload_rate and elapsed >= self.header_timeout and self._body_bytes < self.min_upload_rate * elapsed:
            rate = self._body_bytes / elapsed
            detail = (f"upload too slow ({rate:.0f} bytes/s, the minimum is {self.min_upload_rate:g} bytes/s); "
                      "closing the connection")  # fmt: skip
        else:
            self._guard = self.loop.call_later(min(CHECK_INTERVAL, self.body_timeout - elapsed), self._check)
            return
        self.refusals.note("slow clients timed out (408)")
        self._close_with(408, "request_timeout", detail)

    # --- a client that stops reading -------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_guard is None:
            self._write_guard = self.loop.call_later(self.body_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_guard is not None:
            self._write_guard.cancel()
            self._write_guard = None

    def _write_stalled(self) -> None:
        """The client has not read the response for body_timeout seconds: drop it (the
        application's pending send returns, the connection slot is freed)."""
        self._write_guard = None
        self.transport.abort()

    # --- protocol errors ---------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, as JSON; 431 when the request head is
        over ``h11_max_incomplete_event_size`` (h11's own status hint). The detail never repeats
        what the client sent: a malformed header may carry a secret."""
        import sys

        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400) if isinstance(exc, h11.RemoteProtocolError) else 400
        if status == 431:
            code, detail = "headers_too_large", "request line and headers are over the size limit"
        else:
            status, code, detail = 400, "bad_request", "malformed HTTP request (not valid HTTP/1.1 syntax)"
        self.refusals.note(f"malformed requests ({status})")
        self._cancel()
        self.transport.write(raw_json_response(status, code, detail))
        self.transport.close()


def guarded_protocol(
    *, header_timeout: float, body_timeout: float, min_upload_rate: float, max_connections: int,
    retry_after: int = 1,
) -> type[GuardedH11Protocol]:
    """The protocol class for one server (its own connection registry and refusal log)."""
    return type(
        "SegdH11Protocol", (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout, "min_upload_rate": min_upload_rate,
         "max_connections": max_connections, "retry_after": retry_after, "live": {},
         "refusals": RefusalLog(log)},
    )  # fmt: skip


def check_uvicorn() -> None:
    """Fail at start-up, naming the version, if uvicorn's protocol lacks what the seam uses."""
    import uvicorn

    used = ("connection_made", "connection_lost", "data_received", "on_response_complete", "pause_writing",
            "resume_writing", "send_400_response")  # fmt: skip
    missing = [name for name in used if not callable(getattr(H11Protocol, name, None))]
    if missing:
        raise RuntimeError(f"uvicorn {uvicorn.__version__} is not supported by segd (H11Protocol lacks {missing})")


def quiet_uvicorn_invalid_request_lines() -> None:
    logging.getLogger("uvicorn.error").addFilter(QuietInvalidRequests())


def drain_on_sighup() -> None:
    """A closed terminal or SSH session sends SIGHUP, whose default action kills the process
    and cuts the requests in flight; segd treats it as SIGTERM (stop accepting, drain, exit)."""
    signal.signal(signal.SIGHUP, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


def raise_open_files_limit(connections: int) -> int:
    """Every connection is a file descriptor: lift the soft RLIMIT_NOFILE towards the hard one
    so ``max_connections`` fits beside the models, pipes and logs. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return int(soft)
