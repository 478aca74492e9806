"""Run the daemon under uvicorn (graceful shutdown on SIGTERM: stop accepting, finish
in-flight requests, then exit)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from segd import preprocess
from segd.app.main import create_app
from segd.app.settings import Settings
from segd.errors import InsecureBind

log = logging.getLogger("segd")


def check_bind(settings: Settings) -> None:
    if not settings.is_loopback() and not settings.api_key and not settings.insecure:
        raise InsecureBind(
            f"refusing to listen on {settings.host} without an API key: set SEGD_API_KEY "
            "(or api_key in the config file), or pass --insecure to accept that anyone who can "
            "reach this address can use the service"
        )


def _raw_json_response(status: int, code: str, detail: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 error response with the daemon's JSON error body, for the answers the
    protocol layer gives itself (before or instead of the application)."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    reason = h11_impl.STATUS_PHRASES.get(status, b"")
    head = [f"HTTP/1.1 {status} ".encode() + reason, b"content-type: application/json",
            f"content-length: {len(body)}".encode(), b"connection: close"]  # fmt: skip
    head += [f"{k}: {v}".encode() for k, v in extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus the client deadlines uvicorn does not have.

    uvicorn waits forever for a request's headers and body: a client that opens connections and
    sends nothing (or trickles bytes) holds them, and once ``limit_concurrency`` connections are
    held every other client gets 503 — a slow-loris. Here the headers of each request must
    arrive within ``header_timeout`` seconds of the connection (or of the request's first byte
    on a kept-alive connection) and its body within ``body_timeout`` seconds of the headers;
    otherwise the client gets 408 and the connection is closed. A client that stops reading a
    response (the socket buffers full) is dropped after ``body_timeout`` seconds too. uvicorn's
    own error answers (malformed HTTP 400, headers over the size limit 431) carry the JSON
    error body too.
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._guard: asyncio.TimerHandle | None = None
        self._write_guard: asyncio.TimerHandle | None = None
        self._guard_phase = "headers"
        self._guarded_cycle: Any = None
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._write_guard is not None:
            self._write_guard.cancel()
            self._write_guard = None
        super().connection_lost(exc)

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

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._guard is None and (cycle is None or (cycle.response_complete and not cycle.more_body)):
            self._arm("headers")  # first bytes of the next request on a kept-alive connection
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._guarded_cycle:  # a request's headers arrived
            self._guarded_cycle = cycle
            if cycle.more_body:
                self._arm("body")
            else:
                self._cancel()
        elif self._guard is not None and self._guard_phase == "body" and cycle is not None and not cycle.more_body:
            # The body is complete. If the answer went out before it (e.g. 401 without reading
            # the upload), the connection is idle now: the next request's head must come in time.
            if cycle.response_complete:
                self._arm("headers")
            else:
                self._cancel()

    def _arm(self, phase: str) -> None:
        self._cancel()
        self._guard_phase = phase
        delay = self.header_timeout if phase == "headers" else self.body_timeout
        self._guard = self.loop.call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _expired(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        cycle = self.cycle if self._guard_phase == "body" else None
        limit = self.header_timeout if self._guard_phase == "headers" else self.body_timeout
        if cycle is None or not cycle.response_started:
            what = "headers" if self._guard_phase == "headers" else "body"
            detail = f"request {what} not received within {limit:g} s; closing the connection"
            self.transport.write(_raw_json_response(408, "request_timeout", detail))
        if cycle is not None:  # the application sees a disconnect and stops waiting for the body
            cycle.response_started = cycle.response_complete = True
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, as JSON; 431 when the request head is
        over ``h11_max_incomplete_event_size`` (h11's own status hint)."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400) if isinstance(exc, h11.RemoteProtocolError) else 400
        if status == 431:
            code, detail = "headers_too_large", "request line and headers are over the size limit"
        else:
            status, code = 400, "bad_request"
            detail = f"malformed HTTP request ({str(exc)[:200]})" if exc is not None else "malformed HTTP request"
        self._cancel()
        self.transport.write(_raw_json_response(status, code, detail))
        self.transport.close()


async def _service_unavailable(scope: Any, receive: Any, send: Any) -> None:
    """uvicorn's answer when ``limit_concurrency`` connections are open, as a JSON 503."""
    body = json.dumps({"error": "overloaded", "detail": "too many open connections; retry later"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), (b"retry-after", b"1")]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    return type(
        "SegdH11Protocol", (GuardedH11Protocol,),
        {"header_timeout": settings.header_timeout, "body_timeout": settings.body_timeout},
    )  # fmt: skip


def serve(settings: Settings) -> None:
    check_bind(settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    h11_impl.service_unavailable = _service_unavailable
    preprocess.quiet_codec_warnings()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings),
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout),
        limit_concurrency=max(64, settings.queue_size * len(app.state.service.slots) * 4),
        h11_max_incomplete_event_size=64 * 1024,
        server_header=False,
        access_log=False,
    )
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler that was installed
    # before it started: make that a no-op so a drained shutdown exits with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    SegdServer(config, app).run()


class SegdServer(uvicorn.Server):
    """uvicorn's server; on shutdown the endless camera responses (MJPEG, WebSocket) end first,
    so draining does not wait ``graceful_timeout`` for them."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.segd_app = app

    async def shutdown(self, sockets: Any = None) -> None:
        sources = self.segd_app.state.sources
        if sources is not None:
            sources.end_streams()
        await super().shutdown(sockets)
