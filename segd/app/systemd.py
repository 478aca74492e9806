"""systemd's notify protocol (``sd_notify``): newline-separated ``KEY=value`` datagrams to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).

Why in segd and not a library: the protocol is one ``sendto`` per message, and what matters is
*when* segd sends each one:

- ``READY=1`` only once loading is over (every served model loaded and warmed up / self-tested,
  or failed) and at least one model answers (:func:`serving`). Normally that is exactly when
  ``/readyz`` turns 200. A model that failed to load (a corrupt file, say) keeps ``/readyz`` at
  503 and is named in ``STATUS=``, but it does not hold the others hostage: a restart would not
  mend it, and a restart loop would take the healthy models down with it. With no model able to
  answer there is no READY=1, and systemd's start timeout restarts the service.
- ``WATCHDOG=1`` every ``WATCHDOG_USEC / 3`` from a task on the event loop that serves HTTP, and
  only while every model can answer (on its device or its CPU twin). A wedged loop sends nothing,
  and neither does a service whose Edge TPU vanished with no CPU fallback; after ``WatchdogSec=``
  systemd kills and restarts it (``Restart=on-failure``), and the restart picks the CPU when the
  TPU is gone (``accelerator=auto``).
- ``STATUS=`` lines that ``systemctl status segd`` shows: the backend of each model, or why a
  model is not ready.
- ``STOPPING=1`` when the server shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from segd.settings import environment

if TYPE_CHECKING:
    from segd.app.service import ModelService
    from segd.settings import Settings

log = logging.getLogger("segd")

STATUS_MAX = 400  # characters of one model's error in STATUS= (systemctl shows it on one line)


class Notifier:
    """Sends sd_notify messages; never raises (a lost status message must not stop serving)."""

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sent_ready = False

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier | None:
        """A notifier when systemd asked for one (``NOTIFY_SOCKET``), else None. The watchdog is
        on when ``WATCHDOG_USEC`` is set and ``WATCHDOG_PID`` (if set) is this process."""
        env = environment() if env is None else env
        address = env.get("NOTIFY_SOCKET")
        if not address or not (address.startswith("/") or address.startswith("@")):
            return None
        return cls(address, watchdog_interval(env, os.getpid() if pid is None else pid))

    def send(self, message: str) -> bool:
        try:
            self.sock.sendto(message.encode(), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", message.partition("\n")[0], exc)
            return False

    def close(self) -> None:
        self.sock.close()

    async def run(self, service: ModelService, settings: Settings, poll: float = 0.05) -> None:
        """Report loading, then READY=1 once the service is ready, then ping the watchdog."""
        last_status = ""

        def status(line: str) -> None:
            nonlocal last_status
            if line != last_status:
                self.send("STATUS=" + line)
                last_status = line

        while not serving(service):
            status(status_line(service))
            await asyncio.sleep(poll)
        self.send("READY=1\nSTATUS=" + status_line(service))
        self.sent_ready = True
        last_status = status_line(service)
        if not (settings.watchdog and self.watchdog_usec):
            return
        period = self.watchdog_usec / 1e6 / 3
        was_healthy = True
        while True:
            ok = healthy(service)
            if ok:
                self.send("WATCHDOG=1")
            elif was_healthy:
                log.warning("withholding systemd watchdog pings: %s", status_line(service))
            was_healthy = ok
            status(status_line(service))
            await asyncio.sleep(period)


def watchdog_interval(env: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` in microseconds when it is meant for process ``pid``, else None."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec)


def serving(service: ModelService) -> bool:
    """Start-up is over and at least one model answers: the moment for READY=1."""
    return service.loaded.is_set() and any(s.can_answer for s in service.slots.values())


def healthy(service: ModelService) -> bool:
    """Healthy while every model that loaded can answer (on its device or its CPU twin); a model
    that failed at start-up is reported, not restarted for."""
    loaded = [s for s in service.slots.values() if s.state != "failed"]
    return bool(loaded) and all(s.can_answer for s in loaded)


def status_line(service: ModelService) -> str:
    """One line for ``systemctl status``: each model with its backend, or why it is not ready."""
    parts = []
    for name, slot in service.slots.items():
        if slot.state == "loading":
            parts.append(f"{name}=loading")
        elif slot.state == "failed":
            error = (slot.error or "unknown error").replace("\n", " ")
            if len(error) > STATUS_MAX:
                error = error[: STATUS_MAX - 1] + "…"
            parts.append(f"{name}=failed ({error})")
        elif slot.ready:
            assert slot.primary is not None
            parts.append(f"{name}={slot.primary.backend}")
        elif slot.fallback is not None:
            parts.append(f"{name}=cpu (Edge TPU gone, serving on the CPU twin)")
        else:
            parts.append(f"{name}=not ready (Edge TPU gone)")
    if all(s.state == "loading" for s in service.slots.values()):
        return "loading models: " + ", ".join(parts)
    if service.ready() or healthy(service):
        return "serving " + ", ".join(parts)
    return "not ready: " + ", ".join(parts) + " — run `segd doctor`"
