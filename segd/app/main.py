"""The FastAPI application: wiring only — settings, the model service, error mapping, limits,
metrics and the API key. Routes live in ``segd.app.routes``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from segd import __version__
from segd.app.conformance import HttpConformance
from segd.app.metrics import Metrics
from segd.app.service import ModelService
from segd.errors import ConfigError, Overloaded, SegdError, UploadTooLarge, error_body
from segd.settings import Settings
from segd.sources.runner import SourceManager
from segd.variants import Manifest, load_manifest

log = logging.getLogger("segd")
access = logging.getLogger("segd.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_STATUSES = {503}
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "upload_too_large", 415: "unsupported_media_type", 422: "bad_parameter"}  # fmt: skip


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, detail), status_code=status, headers=headers)


class UploadsOverBudget(Overloaded):
    """Refused mid-upload: the answer closes the connection (the rest of the body is not read)."""


class UploadBudget:
    """Bytes of request bodies held in memory by all requests at once (from the first byte read
    until the answer is sent). Charged as bytes arrive, not as declared, so slow or idle
    uploads cost only what they sent; over the budget a request is refused (503), never made to
    wait, so uploads can never deadlock each other."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise UploadsOverBudget(
                f"uploads in flight hold {self.used} bytes, the budget is {self.limit} bytes; retry later"
            )
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class BodyLimit:
    """Refuse bodies over the limit: by Content-Length up front, and by counting while the body
    streams in (chunked uploads), so an oversized upload is never held in memory. Every body
    byte read is charged to the shared upload budget until the request is answered."""

    def __init__(self, app: ASGIApp, limit: int, budget: UploadBudget) -> None:
        self.app = app
        self.limit = limit
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await self._refuse(send, f"upload of {declared} bytes is over the limit of {self.limit} bytes")
                    return
        seen = 0
        limit = self.limit
        budget = self.budget

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                if seen + n > limit:
                    raise UploadTooLarge(f"upload is over the limit of {limit} bytes")
                budget.take(n)
                seen += n
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            budget.give(seen)

    async def _refuse(self, send: Send, detail: str) -> None:
        response = error_response(413, UploadTooLarge.code, detail, {"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class RecordRequests:
    """Count requests by route template, status and model; time them; with ``access_log``, log
    one line per request: client, method, path, status, milliseconds, model."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            model = (scope.get("state") or {}).get("model", "")
            elapsed = time.perf_counter() - t0
            self.metrics.requests.labels(template, str(status), model).inc()
            self.metrics.latency.labels(template).observe(elapsed)
            if self.access_log and access.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                query = scope.get("query_string", b"").decode("latin-1")
                target = scope.get("path", "") + (f"?{query}" if query else "")
                access.info('%s "%s %s" %d %.1fms%s', client[0], scope.get("method", "-"), target[:300],
                            status, elapsed * 1000, f" model={model}" if model else "")  # fmt: skip


def create_app(settings: Settings, manifest: Manifest | None = None) -> FastAPI:
    manifest = manifest or load_manifest(models_dir=settings.models_dir)
    service = ModelService(settings, manifest)
    try:
        sources = SourceManager(settings, service) if settings.sources else None
        if settings.mqtt is not None and importlib.util.find_spec("paho") is None:
            raise ConfigError("[mqtt] is configured but paho-mqtt is not installed: pip install 'segd[mqtt]'")
    except BaseException:
        service.close()  # its decode workers are starting: stopped, not left to die mid-start
        raise
    metrics = Metrics(service, sources)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=service.load_all, name="segd-load", daemon=True)
        loader.start()
        monitor = asyncio.create_task(_watch_devices(service, settings.device_check_interval))
        from segd.app.systemd import Notifier

        notifier = Notifier.from_env()
        heart = asyncio.create_task(notifier.run(service, settings)) if notifier else None
        publisher = None
        if sources is not None:
            sources.start()
            if settings.mqtt is not None:
                from segd.mqtt import MqttPublisher

                publisher = MqttPublisher(settings.mqtt, sources)
                publisher.start()
                app.state.mqtt = publisher
        try:
            yield
        finally:
            if sources is not None:
                await sources.stop()
            if publisher is not None:
                await asyncio.to_thread(publisher.stop)
            monitor.cancel()
            if heart is not None:
                heart.cancel()
                notifier.send("STOPPING=1") if notifier else None
            service.close()

    # /docs with the Swagger UI files shipped in the fastapi-offline package: a Pi on a LAN
    # without internet shows it too (FastAPI's default page loads them from a CDN). No /redoc:
    # ReDoc still fetches its logo from its CDN.
    app = FastAPIOffline(
        redoc_url=None,
        title="segd",
        version=__version__,
        description="Semantic segmentation on a Raspberry Pi with a Coral Edge TPU (DeepLab v3).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.sources = sources
    app.state.mqtt = None  # the MQTT publisher while it runs

    @app.exception_handler(SegdError)
    async def segd_error(request: Request, exc: SegdError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None) or settings.retry_after
        headers = {"Retry-After": str(retry_after)} if exc.http_status in RETRY_STATUSES else None
        if isinstance(exc, UploadsOverBudget):
            headers = {**(headers or {}), "Connection": "close"}
        if exc.http_status >= 500 and exc.http_status != 503:
            log.error("%s: %s", exc.code, exc.detail)
        return error_response(exc.http_status, exc.code, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
        return error_response(422, "bad_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")

    from segd.app import page, routes

    app.include_router(routes.public)
    app.include_router(routes.protected)
    app.include_router(page.router)
    if sources is not None:
        from segd.app import sources as source_routes

        app.include_router(source_routes.router)
        app.include_router(source_routes.ws_router)
    if settings.test_hooks:
        from segd.app import debug

        app.include_router(debug.router, dependencies=[Depends(routes.require_api_key)])
    # The last added is the outermost: requests refused by the body limit are counted too.
    app.state.upload_budget = UploadBudget(settings.upload_budget_bytes)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes, budget=app.state.upload_budget)
    app.add_middleware(RecordRequests, metrics=metrics, access_log=settings.access_log)
    app.add_middleware(HttpConformance, max_header_bytes=settings.max_header_bytes)
    return app


async def _watch_devices(service: ModelService, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        if service.loaded.is_set():
            await asyncio.to_thread(service.check_devices)
