"""The built-in web page: ``GET /`` and ``GET /static/{name}`` from package data.

Public on purpose: the page holds no data and no secret; it asks the user for the API key and
sends it with its own API calls like any other client. Files are read from the installed
package (``segd/app/static``), so the page works on an offline Pi with no build step.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from segd.errors import PageNotFound

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}

# The page talks only to its own origin; blob: for the picked photo, mediastream: for the camera.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
        "script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def static_files() -> dict[str, tuple[bytes, str]]:
    """Name -> (content, ETag) of every servable file shipped in ``segd/app/static``. Read once:
    the set of names is the allow-list, so no request path ever reaches the file system."""
    root = resources.files("segd.app") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    for entry in root.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in MEDIA_TYPES:
            data = entry.read_bytes()
            files[entry.name] = (data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
    return files


def serve(name: str, request: Request) -> Response:
    """One static file with its media type, security headers and an ETag (a 304 when the
    browser already has it: the Pi's link may be slow)."""
    found = static_files().get(name)
    if found is None:
        raise PageNotFound(f"no such page file: {name!r}")
    data, etag = found
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    media = MEDIA_TYPES["." + name.rpartition(".")[2]]
    return Response(data, media_type=media, headers=headers)


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: Request) -> Response:
    return serve("index.html", request)


@router.get("/static/{name}")
async def static(name: str, request: Request) -> Response:
    return serve(name, request)
