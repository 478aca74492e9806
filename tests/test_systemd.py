"""segd under systemd: the notify/watchdog protocol over a real AF_UNIX datagram socket with the
real daemon, and the unit file checked by systemd's own tools (``systemd-analyze``)."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemon import Daemon, start_daemon

from segd.app.settings import Settings, load_settings
from segd.app.systemd import Notifier, watchdog_interval

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "segd.service"
ENV_FILE = REPO / "systemd" / "segd.env"
RULES = REPO / "systemd" / "99-coral-edgetpu.rules"
DM05 = "deeplabv3_mnv2_dm05_pascal"
WATCHDOG_USEC = 300_000  # 0.3 s: segd pings every 0.1 s


# --- a systemd stand-in for the notify socket: only the socket, the protocol is segd's ---------
class NotifySocket:
    """Listens where ``NOTIFY_SOCKET`` points and timestamps every datagram, like PID 1 does."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        assert len(self.path) < 100, self.path  # sun_path limit
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            stamp = time.monotonic()
            with self.lock:
                for line in data.decode().split("\n"):
                    self.messages.append((stamp, line))

    def lines(self, prefix: str = "") -> list[tuple[float, str]]:
        with self.lock:
            return [(t, m) for t, m in self.messages if m.startswith(prefix)]

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [t for t, m in self.lines() if m == line]
            if found:
                return found[0]
            time.sleep(0.01)
        raise TimeoutError(f"no {line!r} within {timeout} s; got {self.lines()}")

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to 107 bytes and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="segd-notify-") as tmp:
        listener = NotifySocket(Path(tmp))
        yield listener
        listener.close()


def notify_env(listener: NotifySocket, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "SEGD_TEST_HOOKS": "1", **extra}  # fmt: skip


class _GatedMirror(http.server.SimpleHTTPRequestHandler):
    """Serves model files only once the test opens the gate: loading is as slow as we want."""

    gate = threading.Event()

    def do_GET(self) -> None:
        self.gate.wait(60)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


# --- the protocol, end to end --------------------------------------------------------------------
def test_ready_only_after_warm_up_then_watchdog_pings_that_stop_while_the_loop_is_wedged(
    tmp_path: Path, test_data: Path, notify_socket: NotifySocket
) -> None:
    handler = type("Gate", (_GatedMirror,), {"gate": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(test_data)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    empty = tmp_path / "models"
    empty.mkdir()
    d = start_daemon(tmp_path, empty, "--model", DM05, "--accelerator", "cpu",
                     "--mirror", f"http://127.0.0.1:{server.server_address[1]}",
                     env=notify_env(notify_socket), wait="healthy")  # fmt: skip
    try:
        # Loading is held at the gate: the HTTP server answers, the service is not ready, and
        # systemd has been told only that models are loading.
        time.sleep(1.0)
        assert httpx.get(d.url + "/readyz").status_code == 503
        assert notify_socket.lines("READY=1") == []
        assert notify_socket.lines("WATCHDOG=1") == []
        assert any("loading models" in m for _, m in notify_socket.lines("STATUS="))

        gate_opened = time.monotonic()
        handler.gate.set()
        ready_at = notify_socket.wait_for("READY=1", timeout=60)
        assert ready_at > gate_opened
        assert httpx.get(d.url + "/readyz").status_code == 200  # READY=1 implies /readyz is 200
        assert f"STATUS=serving {DM05}=cpu" in [m for _, m in notify_socket.lines("STATUS=")]

        # Healthy: pings every WATCHDOG_USEC/3, none before READY=1, never a gap systemd would
        # count as a missed watchdog.
        time.sleep(1.5)
        pings = [t for t, _ in notify_socket.lines("WATCHDOG=1")]
        assert pings and min(pings) >= ready_at
        assert len(pings) >= 8, pings
        assert max(gaps(pings)) < WATCHDOG_USEC / 1e6, gaps(pings)

        # Wedge the event loop for 1.5 s: no pings while it is blocked, then they resume.
        before = len(pings)
        t0 = time.monotonic()
        r = httpx.post(d.url + "/debug/wedge", params={"seconds": 1.5}, timeout=10)
        t1 = time.monotonic()
        assert r.status_code == 200 and r.json()["blocked_seconds"] >= 1.5
        time.sleep(0.6)
        pings = [t for t, _ in notify_socket.lines("WATCHDOG=1")]
        during = [t for t in pings if t0 + 0.15 < t < t1 - 0.15]
        assert during == [], during
        stalls = [g for g in gaps(pings[before - 1 :]) if g > WATCHDOG_USEC / 1e6]
        assert len(stalls) == 1 and stalls[0] >= 1.4, gaps(pings[before - 1 :])
        assert len([t for t in pings if t > t1]) >= 3  # the loop is back, so are the pings
    finally:
        code = d.stop()
        server.shutdown()
    assert code == 0
    assert notify_socket.lines("STOPPING=1"), notify_socket.lines()


def test_a_model_that_cannot_load_never_reports_ready_and_status_says_why(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "deeplabv3_mnv2_dm05_pascal_quant.tflite").write_bytes(b"not the model")
    d = start_daemon(tmp_path, models, "--model", DM05, "--accelerator", "cpu",
                     env=notify_env(notify_socket), wait="healthy")  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not any("failed" in m for _, m in notify_socket.lines("STATUS=")):
            assert time.monotonic() < deadline, notify_socket.lines()
            time.sleep(0.05)
        time.sleep(0.5)
        status = [m for _, m in notify_socket.lines("STATUS=")][-1]
        assert status.startswith(f"STATUS=not ready: {DM05}=failed (")
        assert "sha256" in status and "segd models pull --force" in status and "segd doctor" in status
        assert notify_socket.lines("READY=1") == []
        assert notify_socket.lines("WATCHDOG=1") == []
        assert httpx.get(d.url + "/readyz").status_code == 503
    finally:
        d.stop()


def test_no_notify_socket_means_no_notifier_and_the_debug_routes_need_test_hooks(
    tmp_path: Path, models_dir: Path
) -> None:
    assert Notifier.from_env({}) is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "relative/path"}) is None
    d: Daemon = start_daemon(tmp_path, models_dir, "--model", DM05, "--accelerator", "cpu")
    try:
        assert httpx.post(d.url + "/debug/wedge", params={"seconds": 0.1}).status_code == 404
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_honoured_only_for_this_process(env: dict[str, str], expected: int | None) -> None:
    assert watchdog_interval(env, 1234) == expected


def test_abstract_notify_socket_names_are_supported() -> None:
    name = f"segd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        assert notifier.send("STATUS=hello")
        assert listener.recv(100) == b"STATUS=hello"
        notifier.close()
