"""HTTP routes: parse, call the service, format. No numpy here."""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from segd.app.service import ModelService, Result
from segd.errors import BadParameter, ClientGone, Unauthorized, UnsupportedContentType
from segd.regions import Shape

RAW_TYPES = ("image/", "application/octet-stream")


class ErrorBody(BaseModel):
    error: str
    detail: str


# Dependencies are ``async def``: FastAPI runs a plain ``def`` one in a thread pool, a thread
# hop (two wake-ups) per request for a few attribute reads.
async def get_service(request: Request) -> ModelService:
    service: ModelService = request.app.state.service
    return service


def api_key_of(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: ``X-API-Key``, ``Authorization: Bearer KEY``, or HTTP Basic with
    the key as the password (what Home Assistant's MJPEG camera can send)."""
    given = headers.get("x-api-key")
    if given is not None:
        return given
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(token.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


async def require_api_key(request: Request) -> None:
    """Enforce the API key (see :func:`api_key_of`), compared in constant time; the key is
    never logged or echoed."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    given = api_key_of(request.headers)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("missing or wrong API key (send X-API-Key or Authorization: Bearer)")


Service = Annotated[ModelService, Depends(get_service)]

public = APIRouter()
protected = APIRouter(
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorBody, "description": "missing or wrong API key (when one is configured)"}},
)


# --- health --------------------------------------------------------------------------------
@public.get("/healthz", tags=["health"], summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/readyz", tags=["health"], summary="Every model loaded, self-tested and its device present",
            responses={503: {"description": "not ready: the same document, naming each model's state and error"}})
async def readyz(request: Request, service: Service) -> JSONResponse:
    doc = service.readiness()
    if request.app.state.sources is not None:  # cameras are reported, not required: an offline
        doc["sources"] = request.app.state.sources.readiness()  # camera is no reason to restart segd
    return JSONResponse(doc, status_code=200 if doc["ready"] else 503)


# --- models --------------------------------------------------------------------------------
@protected.get("/models", tags=["models"], summary="Served models: backend and why, device, sizes, labels, stats")
async def list_models(service: Service) -> dict[str, Any]:
    return {"default": service.default, "models": [s.describe() for s in service.slots.values()]}


@protected.get("/models/{name}", tags=["models"], summary="One served model",
               responses={404: {"model": ErrorBody, "description": "unknown model"}})
async def get_model(name: str, service: Service) -> dict[str, Any]:
    return service.slot(name).describe()


@protected.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse,
               responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# --- segment -------------------------------------------------------------------------------
SEGMENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


ERRORS = (
    (400, "corrupt, truncated or empty image"),
    (401, "missing or wrong API key"),
    (404, "unknown model"),
    (413, "upload or image too large"),
    (415, "not an image / unsupported content type"),
    (422, "bad parameter"),
    (503, "model not ready, queue full, Edge TPU failure or timeout (see Retry-After)"),
)
SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "PNG mask (pixel value = class id, dataset palette), JSON summary or overlay",
        "content": {"image/png": {}, "image/jpeg": {}, "application/json": {}},
    },
    **{code: {"model": ErrorBody, "description": why} for code, why in ERRORS},
}


async def read_image(request: Request) -> bytes:
    """The image from a multipart field ``image`` or from a raw image body."""
    try:
        return await _read_image(request)
    except ClientDisconnect:
        raise ClientGone("the client closed the connection before the upload was complete") from None


async def _read_image(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=4, max_fields=16)
        try:
            files = [v for v in form.getlist("image") if isinstance(v, UploadFile)]
            if not files:
                if form.getlist("image"):
                    raise BadParameter("form field 'image' must be a file upload, not text")
                raise BadParameter("multipart body has no file field 'image'")
            if len(files) > 1:
                raise BadParameter(f"expected one file in field 'image', got {len(files)}")
            return await files[0].read()
        finally:
            await form.close()
    if ctype.startswith(RAW_TYPES):
        return await request.body()
    # The value is not repeated: nothing a client sends in a header is echoed (it may be a secret).
    what = "this content type is" if ctype else "a request without a content type is"
    raise UnsupportedContentType(
        f"{what} not accepted: send multipart/form-data with a file field 'image', or the raw image "
        "with an image/* or application/octet-stream content type"
    )


def result_response(result: Result) -> Response:
    timing = ", ".join(f"{k};dur={v:.2f}" for k, v in result.timings.items())
    headers = {
        "X-Segd-Model": result.model,
        "X-Segd-Backend": result.backend,
        "X-Segd-Timings": json.dumps({k: round(v, 3) for k, v in result.timings.items()}, separators=(",", ":")),
        "Server-Timing": timing,
    }
    if result.media_type == "application/json":
        return JSONResponse(result.document, headers=headers)
    # The class areas ride along with a mask or overlay, so one request (one inference) gives
    # both picture and numbers; ASCII-only JSON is a valid header value.
    headers["X-Segd-Summary"] = json.dumps(result.document, separators=(",", ":"), ensure_ascii=True)
    return Response(result.body, media_type=result.media_type, headers=headers)


@protected.post("/segment", tags=["segment"], summary="Segment an image", openapi_extra=SEGMENT_BODY,
                responses=SEGMENT_RESPONSES)
async def segment(
    request: Request,
    service: Service,
    model: Annotated[str | None, Query(description="variant name (default: the default model)", max_length=200)] = None,
    format: Annotated[Literal["png", "json", "overlay"], Query(description="response format")] = "png",
    keep_aspect: Annotated[bool, Query(description="letterbox instead of stretching")] = False,
    overlay_format: Annotated[Literal["jpeg", "png"], Query(description="image format of an overlay")] = "jpeg",
    classes: Annotated[str | None, Query(description="keep only these classes (labels or ids, comma-separated); the others become background", max_length=2000)] = None,
    min_area: Annotated[int, Query(description="connected regions smaller than this many pixels become background", ge=0)] = 0,
    polygons: Annotated[bool, Query(description="format=json: each class's outer contours as COCO polygons [[x0, y0, x1, y1, ...]]")] = False,
    rle: Annotated[Literal["none", "compressed", "uncompressed"], Query(description="format=json: each class's mask as COCO RLE (pycocotools)")] = "none",
) -> Response:
    slot = service.slot(model)  # 404 before reading a large body for nothing
    request.state.model = slot.name
    if (polygons or rle != "none") and format != "json":
        raise BadParameter("polygons and rle are parts of the JSON answer: use format=json")
    wanted = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes is not None else None
    shape = None
    if wanted is not None or min_area or polygons or rle != "none":
        shape = Shape(wanted, min_area, polygons, None if rle == "none" else rle)
    # The whole upload arrives before the request asks the model's queue for a place: slow
    # uploads hold only their bytes (charged to the upload budget), never the model.
    data = await read_image(request)
    result = await service.segment(
        slot.name, data, fmt=format, keep_aspect=keep_aspect, overlay_format=overlay_format, shape=shape,
    )  # fmt: skip
    request.app.state.metrics.observe_stages(result.model, result.timings)
    return result_response(result)
