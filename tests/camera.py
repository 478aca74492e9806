"""A fake IP camera on 127.0.0.1 for the source tests: an HTTP MJPEG stream
(``/stream``, ``multipart/x-mixed-replace`` at a given rate, or as fast as the socket takes
it) and a still image (``/snapshot.jpg``). It can be stopped and started again on the same
port, like a camera that reboots."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Sequence


class Camera:
    def __init__(self, frames: Sequence[bytes], fps: float | None = 10.0, port: int = 0) -> None:
        self.frames = list(frames)
        self.fps = fps  # None: as fast as the client reads
        self.frozen = False  # True: connections stay open but no frame is sent (a hung camera)
        self.sent = 0
        self.port = port
        self._server: http.server.ThreadingHTTPServer | None = None
        self._stopped = threading.Event()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        camera = self
        self._stopped.clear()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/snapshot.jpg"):
                    data = camera.frames[camera.sent % len(camera.frames)]
                    camera.sent += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if not self.path.startswith("/stream"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=camframe")
                self.end_headers()
                i = 0
                try:
                    while not camera._stopped.is_set():
                        if camera.frozen:
                            time.sleep(0.05)
                            continue
                        data = camera.frames[i % len(camera.frames)]
                        i += 1
                        self.wfile.write(b"--camframe\r\nContent-Type: image/jpeg\r\n"
                                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n")
                        camera.sent += 1
                        if camera.fps:
                            time.sleep(1.0 / camera.fps)
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.handle_error = lambda *a: None  # type: ignore[method-assign]
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Close the listening socket and every open stream (a camera that went away)."""
        self._stopped.set()
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None

    def port_is_free(self) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                return False
            return True
