"""RTSP (and any stream ffmpeg reads: H.264 over HTTP, HLS) through an ``ffmpeg`` subprocess
that decodes the video and writes JPEG frames at the source's rate as an MJPEG stream on its
stdout. A subprocess keeps a misbehaving decoder or camera out of the daemon's memory."""

from __future__ import annotations

import collections
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import IO

from segd.settings import SourceSettings
from segd.sources.base import FrameReader, SourceError, read_multipart


def ffmpeg_command(url: str, fps: float, timeout: float) -> list[str]:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise SourceError("ffmpeg is not installed (apt-get install ffmpeg)")
    cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "error"]
    if url.lower().startswith(("rtsp://", "rtsps://")):
        cmd += ["-rtsp_transport", "tcp", "-timeout", str(int(timeout * 1e6))]
    else:
        cmd += ["-rw_timeout", str(int(timeout * 1e6))]
    cmd += ["-i", url, "-an", "-vf", f"fps={fps:g}", "-c:v", "mjpeg", "-q:v", "3", "-f", "mpjpeg", "pipe:1"]
    return cmd


def _drain(stream: IO[bytes] | None, into: collections.deque[str]) -> None:
    if stream is None:
        return
    for line in iter(lambda: stream.readline(4096), b""):
        text = line.decode(errors="replace").strip()
        if text:
            into.append(text)


class RtspReader(FrameReader):
    def __init__(self, settings: SourceSettings, max_frame_bytes: int) -> None:
        super().__init__(settings, max_frame_bytes)
        self._proc: subprocess.Popen[bytes] | None = None

    def frames(self) -> Iterator[bytes]:
        s = self.settings
        cmd = ffmpeg_command(s.url, s.fps, s.timeout)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._proc = proc
        # ffmpeg's messages are drained all the time (a flaky stream can print decode errors
        # without end: a full stderr pipe would stall ffmpeg); the last few say why it ended.
        messages: collections.deque[str] = collections.deque(maxlen=8)
        drain = threading.Thread(target=_drain, args=(proc.stderr, messages), name="ffmpeg-stderr", daemon=True)
        drain.start()
        try:
            assert proc.stdout is not None
            yield from read_multipart(proc.stdout, self.max_frame_bytes)  # type: ignore[arg-type]
        finally:
            self._stop()
            drain.join(5)
        if not self.closed:
            last = messages[-1] if messages else f"exit status {proc.returncode}"
            raise SourceError(f"ffmpeg ended: {last}")

    def _stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        super().close()
        self._stop()
