"""systemd's notify protocol (``sd_notify``): a datagram to ``$NOTIFY_SOCKET``.

``READY=1`` only once every model is loaded and self-tested; ``WATCHDOG=1`` from the event loop
every ``WATCHDOG_USEC / 3`` while the service is healthy — if the loop is wedged, or a model has
stopped being ready for too long, the pings stop and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segd.app.service import ModelService
    from segd.app.settings import Settings

log = logging.getLogger("segd")


class Notifier:
    def __init__(self, address: str, watchdog_usec: int | None) -> None:
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls) -> Notifier | None:
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watchdog = int(usec) if usec and usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        return cls(address, watchdog)

    def send(self, message: str) -> None:
        try:
            self.sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", message, exc)

    async def run(self, service: ModelService, settings: Settings) -> None:
        self.send("STATUS=loading models")
        while not service.loaded.is_set():
            await asyncio.sleep(0.05)
        self.send("STATUS=" + status_line(service))
        while not service.ready():
            await asyncio.sleep(0.2)
        self.send("READY=1\nSTATUS=" + status_line(service))
        if not (settings.watchdog and self.watchdog_usec):
            return
        period = self.watchdog_usec / 1e6 / 3
        last_status = ""
        while True:
            if healthy(service):
                self.send("WATCHDOG=1")
            line = status_line(service)
            if line != last_status:
                self.send("STATUS=" + line)
                last_status = line
            await asyncio.sleep(period)


def healthy(service: ModelService) -> bool:
    """Serving is healthy when every model can answer (on its device or its CPU twin)."""
    return all(s.ready or (s.fallback is not None and s.state == "ready") for s in service.slots.values())


def status_line(service: ModelService) -> str:
    parts = []
    for name, slot in service.slots.items():
        backend = slot.primary.backend if slot.primary else slot.state
        parts.append(f"{name}={backend}" + ("" if slot.ready else " (not ready)"))
    return "serving " + ", ".join(parts)
