"""Start the real daemon (``python -m segd serve``) on a free 127.0.0.1 port for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not healthy after {timeout}s:\n{self.output()}")

    def wait_ready(self, timeout: float = 60, headers: dict[str, str] | None = None) -> None:
        self.wait_healthy(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/readyz", timeout=5, headers=headers)
            if r.status_code == 200:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.output()}")
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready after {timeout}s: {r.text}\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(
    tmp_path: Path, models_dir: Path, *args: str, env: dict[str, str] | None = None, wait: str = "ready"
) -> Daemon:
    port = free_port()
    log = tmp_path / f"segd-{port}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEGD_") or k == "SEGD_TEST_DATA"}
    environ.update({"SEGD_MODELS_DIR": str(models_dir), "SEGD_LOG_LEVEL": "warning"})
    environ.update(env or {})
    cmd = [sys.executable, "-m", "segd", "serve", "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environ)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", log)
    try:
        if wait == "ready":
            daemon.wait_ready(headers={"X-API-Key": environ["SEGD_API_KEY"]} if "SEGD_API_KEY" in environ else None)
        elif wait == "healthy":
            daemon.wait_healthy()
    except Exception:
        daemon.stop(signal.SIGKILL)
        raise
    return daemon
