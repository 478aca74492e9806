"""Run the daemon under uvicorn (graceful shutdown on SIGTERM: stop accepting, finish
in-flight requests, then exit)."""

from __future__ import annotations

import logging
import signal

import uvicorn

from segd.app.main import create_app
from segd.app.settings import Settings


class InsecureBind(ValueError):
    pass


def check_bind(settings: Settings) -> None:
    if not settings.is_loopback() and not settings.api_key and not settings.insecure:
        raise InsecureBind(
            f"refusing to listen on {settings.host} without an API key: set SEGD_API_KEY "
            "(or api_key in the config file), or pass --insecure to accept that anyone who can "
            "reach this address can use the service"
        )


def serve(settings: Settings) -> None:
    check_bind(settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout),
        limit_concurrency=max(64, settings.queue_size * len(app.state.service.slots) * 4),
        h11_max_incomplete_event_size=64 * 1024,
        server_header=False,
        access_log=False,
    )
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler that was installed
    # before it started: make that a no-op so a drained shutdown exits with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
