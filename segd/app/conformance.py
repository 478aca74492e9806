"""HTTP/1.1 rules the ASGI layer enforces for every route (pure ASGI, no server internals):

- a request head over ``max_header_bytes`` is refused with 431 however its bytes arrived (the
  server's own limit only applies while a head is still incomplete, so a head sent in one
  write slipped past it);
- ``HEAD`` is served as ``GET`` without the body on every route that answers GET (load balancers
  and uptime checks use it);
- an absolute-form request target (``GET http://host/healthz HTTP/1.1``, RFC 9112 3.2.2, what
  a client talking to a proxy sends) is served as its path, with the target's authority as Host.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from segd.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def head_size(scope: Scope) -> int:
    """Bytes of the request line and headers as sent (CRLFs and separators included)."""
    line = len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


def origin_form(scope: Scope) -> Scope:
    """The scope of an absolute-form target rewritten to its path, Host taken from the target."""
    raw = scope.get("raw_path") or b""
    if not raw[:8].lower().startswith((b"http://", b"https://")):
        return scope
    parts = urllib.parse.urlsplit(raw.decode("latin-1"))
    path = parts.path or "/"
    headers = [(k, v) for k, v in scope.get("headers", []) if k != b"host"]
    headers.append((b"host", parts.netloc.encode("latin-1")))
    return {**scope, "path": urllib.parse.unquote(path), "raw_path": path.encode("latin-1"), "headers": headers}


class HttpConformance:
    def __init__(self, app: ASGIApp, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if head_size(scope) > self.max_header_bytes:
            await _refuse_head(send, self.max_header_bytes)
            return
        scope = origin_form(scope)
        if scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


async def _refuse_head(send: Send, limit: int) -> None:
    detail = f"request line and headers are over the size limit of {limit} bytes"
    body = json.dumps(error_body("headers_too_large", detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 431, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
