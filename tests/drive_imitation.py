"""A local imitation of Google Drive's download answers, on 127.0.0.1, for segd's tests.

Each registered file id behaves like one thing Drive does (as gdown and users have documented
it; see docs in segd/gdrive.py):

* ``direct``      ``/uc?export=download&id=ID`` answers the file (small files).
* ``cookie``      the pre-2024 virus-scan interstitial: an HTML page with a
                  ``download_warning_<n>=<token>`` cookie and a ``confirm=<token>`` link;
                  only a request carrying the token gets the file.
* ``form``        the 2024+ interstitial: an HTML page whose GET form posts ``id``, ``export``,
                  ``confirm`` and ``uuid`` to ``/download`` (drive.usercontent.google.com's
                  path); only that request, with the uuid it handed out, gets the file.
* ``quota``       "Too many users have viewed or downloaded this file recently" (403, HTML).
* ``signin``      a sign-in / request-access page (200, HTML).
* ``truncate``    the file, but the first transfer stops halfway (Content-Length promises it
                  all); ``Range`` requests are answered with 206 and the rest.
* unknown ids     404.

The bytes served are read at test time (e.g. a real compiled Coral model from the test data).
"""

from __future__ import annotations

import http.server
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field


@dataclass
class DriveImitation:
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (mode, data)
    requests: list[tuple[str, dict[str, str], str | None]] = field(default_factory=list)
    transfers: dict[str, int] = field(default_factory=dict)  # id -> file bodies started
    base_url: str = ""
    _uuids: dict[str, str] = field(default_factory=dict)
    _server: http.server.ThreadingHTTPServer | None = None

    def add(self, file_id: str, data: bytes, mode: str = "direct") -> None:
        self.files[file_id] = (mode, data)

    def start(self) -> DriveImitation:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(parts.query))
                owner.requests.append((parts.path, q, self.headers.get("Range")))
                owner.handle(self, parts.path, q)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/uc"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- answers --------------------------------------------------------------------------
    def handle(self, h: http.server.BaseHTTPRequestHandler, path: str, q: dict[str, str]) -> None:
        fid = q.get("id", "")
        if fid not in self.files:
            return self._send(h, 404, b"<html><title>Not Found</title>Error 404</html>", "text/html")
        mode, data = self.files[fid]
        if mode == "quota":
            page = (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
                    b"Sorry, you can't view or download this file at this time.<br>Too many users have "
                    b"viewed or downloaded this file recently.</body></html>")  # fmt: skip
            return self._send(h, 403, page, "text/html; charset=utf-8")
        if mode == "signin":
            page = (b"<!DOCTYPE html><html><head><title>Google Drive: Sign-in</title></head><body>"
                    b"You need access. <a href='https://accounts.google.com/ServiceLogin'>Sign in</a>"
                    b"</body></html>")  # fmt: skip
            return self._send(h, 200, page, "text/html; charset=utf-8")
        if mode == "cookie" and path == "/uc":
            token = "Tk3n_" + fid[:6]
            cookie = h.headers.get("Cookie", "")
            if q.get("confirm") == token and f"download_warning_1={token}" in cookie:
                return self._file(h, fid, data)
            page = (f"<html><head><title>Google Drive - Virus scan warning</title></head><body>"
                    f"Google Drive can't scan this file for viruses. <a id='uc-download-link' "
                    f"href='/uc?export=download&amp;confirm={token}&amp;id={fid}'>Download anyway</a>"
                    f"</body></html>").encode()  # fmt: skip
            return self._send(h, 200, page, "text/html; charset=utf-8",
                              {"Set-Cookie": f"download_warning_1={token}; Path=/"})  # fmt: skip
        if mode == "form":
            if path == "/download":
                if q.get("confirm") == "t" and q.get("uuid") == self._uuids.get(fid) and q.get("export") == "download":
                    return self._file(h, fid, data)
                return self._send(h, 400, b"<html><title>Bad Request</title></html>", "text/html")
            self._uuids[fid] = str(uuid.uuid4())
            action = self.base_url.rsplit("/", 1)[0] + "/download"
            page = (f'<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>'
                    f'<body><p>Google Drive can\'t scan this file for viruses.</p>'
                    f'<form id="download-form" action="{action}" method="get">'
                    f'<input type="submit" id="uc-download-link" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{fid}">'
                    f'<input type="hidden" name="export" value="download">'
                    f'<input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="{self._uuids[fid]}"></form></body></html>').encode()  # fmt: skip
            return self._send(h, 200, page, "text/html; charset=utf-8")
        return self._file(h, fid, data, truncate_first=mode == "truncate")

    def _file(self, h: http.server.BaseHTTPRequestHandler, fid: str, data: bytes, *, truncate_first: bool = False) -> None:
        n = self.transfers.get(fid, 0)
        self.transfers[fid] = n + 1
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
            if start >= len(data):
                return self._send(h, 416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            return self._send(h, 206, body, "application/octet-stream", headers)
        if truncate_first and n == 0:
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return None
        return self._send(h, 200, data, "application/octet-stream",
                          {"Content-Disposition": 'attachment; filename="model.tflite"'})  # fmt: skip

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
