"""Run the daemon under uvicorn (graceful shutdown on SIGTERM and SIGHUP: stop accepting,
finish in-flight requests, then exit). Connection-level defences live in ``segd.app.connections``."""

from __future__ import annotations

import logging
import signal
from typing import Any

import uvicorn

from segd import preprocess
from segd.app import connections
from segd.app.main import create_app
from segd.errors import InsecureBind
from segd.settings import Settings

log = logging.getLogger("segd")


MIN_API_KEY_LENGTH = 16  # characters, for a key guarding a non-loopback bind


def check_bind(settings: Settings) -> None:
    if settings.is_loopback() or settings.insecure:
        return
    if not settings.api_key:
        raise InsecureBind(
            f"refusing to listen on {settings.host} without an API key: set SEGD_API_KEY "
            "(or api_key in the config file), or pass --insecure to accept that anyone who can "
            "reach this address can use the service"
        )
    if len(settings.api_key) < MIN_API_KEY_LENGTH:
        raise InsecureBind(
            f"refusing to listen on {settings.host} with an API key of {len(settings.api_key)} characters: "
            f"use at least {MIN_API_KEY_LENGTH} (e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
        )


def serve(settings: Settings) -> None:
    check_bind(settings)
    connections.check_uvicorn()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = connections.raise_open_files_limit(settings.max_connections)
    if files < settings.max_connections + 64:
        logging.getLogger("segd").warning(
            "open-files limit %d is low for max_connections=%d (raise LimitNOFILE)", files, settings.max_connections
        )
    app = create_app(settings)
    preprocess.quiet_codec_warnings()
    connections.quiet_uvicorn_invalid_request_lines()
    protocol = connections.guarded_protocol(
        header_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
        min_upload_rate=settings.min_upload_rate, max_connections=settings.max_connections,
        retry_after=settings.retry_after,
    )  # fmt: skip
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        server_header=False,
        access_log=False,
    )
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler that was installed
    # before it started: make that a no-op so a drained shutdown exits with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    connections.drain_on_sighup()
    SegdServer(config, app).run()
    protocol.refusals.flush()


class SegdServer(uvicorn.Server):
    """uvicorn's server; on shutdown the endless camera responses (MJPEG, WebSocket) end first,
    so draining does not wait ``graceful_timeout`` for them."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.segd_app = app

    async def shutdown(self, sockets: Any = None) -> None:
        sources = self.segd_app.state.sources
        if sources is not None:
            sources.end_streams()
        await super().shutdown(sockets)
