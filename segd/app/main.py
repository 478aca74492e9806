"""The FastAPI application: wiring only — settings, the model service, error mapping, limits,
metrics and the API key. Routes live in ``segd.app.routes``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from segd import __version__
from segd.app.metrics import Metrics
from segd.app.service import ModelService
from segd.errors import SegdError, UploadTooLarge, error_body
from segd.settings import Settings
from segd.variants import Manifest, load_manifest

log = logging.getLogger("segd")

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


class BodyLimit:
    """Refuse bodies over the limit: by Content-Length up front, and by counting while the body
    streams in (chunked uploads), so an oversized upload is never held in memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

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

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise UploadTooLarge(f"upload is over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send: Send, detail: str) -> None:
        response = error_response(413, UploadTooLarge.code, detail, {"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class RecordRequests:
    """Count requests by route template, status and model; time them."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
            self.metrics.requests.labels(template, str(status), model).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - t0)


def create_app(settings: Settings, manifest: Manifest | None = None) -> FastAPI:
    manifest = manifest or load_manifest(models_dir=settings.models_dir)
    service = ModelService(settings, manifest)
    metrics = Metrics(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=service.load_all, name="segd-load", daemon=True)
        loader.start()
        monitor = asyncio.create_task(_watch_devices(service, settings.device_check_interval))
        from segd.app.systemd import Notifier

        notifier = Notifier.from_env()
        heart = asyncio.create_task(notifier.run(service, settings)) if notifier else None
        try:
            yield
        finally:
            monitor.cancel()
            if heart is not None:
                heart.cancel()
                notifier.send("STOPPING=1") if notifier else None
            service.close()

    app = FastAPI(
        title="segd",
        version=__version__,
        description="Semantic segmentation on a Raspberry Pi with a Coral Edge TPU (DeepLab v3).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics

    @app.exception_handler(SegdError)
    async def segd_error(request: Request, exc: SegdError) -> JSONResponse:
        headers = {"Retry-After": str(settings.retry_after)} if exc.http_status in RETRY_STATUSES else None
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
    if settings.test_hooks:
        from segd.app import debug

        app.include_router(debug.router, dependencies=[Depends(routes.require_api_key)])
    # The last added is the outermost: requests refused by the body limit are counted too.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(RecordRequests, metrics=metrics)
    return app


async def _watch_devices(service: ModelService, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        if service.loaded.is_set():
            await asyncio.to_thread(service.check_devices)
