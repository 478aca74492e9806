"""HTTP GET of a configured camera URL with credentials from the URL (``http://user:pass@host``
as Basic auth), a timeout, and no redirects to other hosts."""

from __future__ import annotations

import base64
import http.client
import socket
import urllib.parse

from segd.sources.base import SourceError


def open_url(url: str, timeout: float) -> tuple[http.client.HTTPResponse, socket.socket | None]:
    """Connect and send the GET; a non-200 answer is a :class:`SourceError`. Returns the
    response and its socket (shut it down from another thread to interrupt a read)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(host, parts.port, timeout=timeout)
    headers = {"User-Agent": "segd", "Accept": "*/*"}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        conn.request("GET", target, headers=headers)
        sock = conn.sock
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise SourceError(f"cannot connect: {exc or type(exc).__name__}") from exc
    if response.status != 200:
        response.close()
        conn.close()
        raise SourceError(f"the camera answered HTTP {response.status} {response.reason}")
    return response, sock


def redact(url: str) -> str:
    """The URL without its password, for logs and /sources."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
