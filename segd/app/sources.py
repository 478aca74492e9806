"""Routes of the configured cameras: state, last frame, MJPEG overlay stream, WebSocket of
per-frame summaries. Only a source's name is taken from a request, never a URL."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

from segd.app.routes import ErrorBody, api_key_of, require_api_key
from segd.sources.runner import SourceManager

BOUNDARY = "segdframe"
KEEPALIVE_S = 5.0  # an MJPEG/WebSocket waiter re-checks shutdown this often


async def get_sources(request: Request) -> SourceManager:
    manager: SourceManager = request.app.state.sources
    return manager


Sources = Annotated[SourceManager, Depends(get_sources)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no source of that name is configured"}}

router = APIRouter(
    tags=["sources"],
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorBody, "description": "missing or wrong API key (when one is configured)"},
               422: {"model": ErrorBody, "description": "bad parameter"}},
)


@router.get("/sources", summary="Configured cameras: state, frame counters, reconnects, last summary")
async def list_sources(request: Request, sources: Sources) -> dict[str, Any]:
    mqtt = request.app.state.mqtt
    return {"sources": [s.describe() for s in sources.sources.values()], "mqtt": mqtt.describe() if mqtt else None}


@router.get("/sources/{name}", summary="One camera", responses=NOT_FOUND)
async def get_source(name: str, sources: Sources) -> dict[str, Any]:
    return sources.get(name).describe()


@router.get(
    "/sources/{name}/latest", summary="The camera's last segmented frame",
    responses={**NOT_FOUND, 503: {"model": ErrorBody, "description": "no segmented frame yet"},
               200: {"content": {"image/png": {}, "image/jpeg": {}, "application/json": {}},
                     "description": "mask PNG, JSON summary, overlay JPEG or the camera's frame"}},
)  # fmt: skip
async def latest(
    name: str,
    sources: Sources,
    format: Annotated[Literal["png", "json", "overlay", "frame"], Query(description="png mask (as POST /segment), json, overlay JPEG, or frame: the camera's image as received")] = "png",
) -> Response:
    frame = sources.latest(name)
    headers = {"Cache-Control": "no-store", "X-Segd-Frame": str(frame.seq), "X-Segd-Model": frame.document["model"]}
    if format == "json":
        return JSONResponse(frame.document, headers=headers)
    if format == "frame":
        return Response(frame.data, media_type="image/jpeg", headers=headers)
    source = sources.get(name)
    body = await source.render(frame, "png" if format == "png" else "overlay")
    headers["X-Segd-Summary"] = json.dumps(frame.document, separators=(",", ":"), ensure_ascii=True)
    return Response(body, media_type="image/png" if format == "png" else "image/jpeg", headers=headers)


@router.get(
    "/sources/{name}/stream", summary="MJPEG stream of the overlay (a browser <img>, Home Assistant's MJPEG camera)",
    responses={**NOT_FOUND, 200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}},
                                  "description": "one JPEG part per segmented frame"}},
)  # fmt: skip
async def stream(name: str, sources: Sources) -> StreamingResponse:
    source = sources.get(name)

    async def parts() -> AsyncIterator[bytes]:
        seq = -1
        while not sources.closing:
            frame = await source.next_frame(seq, KEEPALIVE_S)
            if frame is None:
                continue
            seq = frame.seq
            jpeg = await source.render(frame, "overlay")
            head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
            yield head.encode() + jpeg + b"\r\n"

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(parts(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}", headers=headers)


ws_router = APIRouter()


@ws_router.websocket("/sources/{name}/events")
async def events(websocket: WebSocket, name: str) -> None:
    """Per-frame JSON summaries. With an API key configured, send it as a header (X-API-Key,
    Authorization) or, from a browser, as the first text message."""
    sources: SourceManager = websocket.app.state.sources
    expected = websocket.app.state.settings.api_key
    source = sources.sources.get(name)
    await websocket.accept()
    try:
        if expected:
            given = api_key_of(websocket.headers)
            if given is None:
                with contextlib.suppress(TimeoutError):
                    given = await asyncio.wait_for(websocket.receive_text(), 10)
            if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
                await websocket.close(code=1008, reason="missing or wrong API key")
                return
        if source is None:
            await websocket.close(code=1008, reason=f"no source named {name!r}")
            return
        seq = source.latest.seq if source.latest else 0
        while not sources.closing:
            frame = await source.next_frame(seq, KEEPALIVE_S)
            if frame is not None:
                seq = frame.seq
                await websocket.send_json(frame.document)
        await websocket.close(code=1001, reason="server shutting down")
    except WebSocketDisconnect:
        pass
