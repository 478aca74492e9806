"""One settings object for the daemon: defaults < TOML file < ``SEGD_*`` environment < flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from segd.engine import DEFAULT_MAX_PIXELS

MiB = 1024 * 1024


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    models_dir: Path | None = None
    mirror: str | None = None  # directory or base URL to fetch missing model files from
    models: list[str] = field(default_factory=list)  # variants to serve (default: the default one)
    default_model: str | None = None  # default: the manifest's default (or the first served)
    accelerator: str = "auto"  # auto | cpu | edgetpu
    device: str | None = None  # Edge TPU device (usb, usb:0, pci:0, ...)
    runtime: str | None = None  # litert | tflite_runtime
    threads: int | None = None
    api_key: str | None = None
    insecure: bool = False  # allow a non-loopback bind without an API key
    max_upload_bytes: int = 20 * MiB
    max_pixels: int = DEFAULT_MAX_PIXELS
    queue_size: int = 8  # requests admitted per variant (in flight + waiting); more -> 503
    memory_budget: int = 448 * MiB  # bytes all requests in process may take at once (charged from each header); more wait, a request over it alone gets 413
    request_timeout: float = 30.0  # seconds for the whole pipeline of one request
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive (slow clients get 408)
    body_timeout: float = 60.0  # seconds for a request's body to arrive after its headers (408)
    retry_after: int = 1  # seconds, sent with 503 overloaded
    tpu_isolation: bool = True  # run Edge TPU interpreters in a supervised worker process
    decode_isolation: bool = True  # decode images in supervised worker processes (a decoder crash costs one request)
    decode_workers: int = 2  # image decode processes (each ~30 MB idle; decodes run in parallel up to this)
    tpu_fallback: str = "cpu"  # when the TPU worker dies: "cpu" (serve on the CPU twin) | "503"
    device_check_interval: float = 5.0  # seconds between Edge TPU presence checks
    tpu_timeout: float = 5.0  # seconds for one Edge TPU invoke; a hung TPU worker is killed and restarted
    worker_restart_base: float = 0.5  # seconds, doubled per consecutive crash
    worker_restart_max: float = 30.0
    graceful_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    watchdog: bool = True  # systemd watchdog pings when NOTIFY_SOCKET/WATCHDOG_USEC are set
    log_level: str = "info"
    test_hooks: bool = False  # enables /debug routes used by the test suite only

    def is_loopback(self) -> bool:
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


_FIELDS = {f.name: f for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    """Turn TOML/env/flag values into the field's type, with errors naming the setting."""
    default = _FIELDS[name].default
    kind = type(default) if default is not dataclasses.MISSING and default is not None else None
    try:
        if name == "models":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if name == "models_dir":
            return Path(value) if value not in (None, "") else None
        if value is None:
            return None
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"not a boolean: {value!r}")
            return bool(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if name == "threads":
            return int(value) if value not in ("", 0, "0") else None
        return str(value) if value != "" else None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {name}: {exc}") from None


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    values: dict[str, Any] = {}
    if config is not None:
        try:
            data = tomllib.loads(Path(config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read config {config}: {exc}") from exc
        data = data.get("segd", data)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ValueError(f"{config}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    env = os.environ if env is None else env
    for name in _FIELDS:
        raw = env.get("SEGD_" + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    if s.accelerator not in ("auto", "cpu", "edgetpu"):
        raise ValueError(f"accelerator must be auto, cpu or edgetpu, not {s.accelerator!r}")
    if s.tpu_fallback not in ("cpu", "503"):
        raise ValueError(f"tpu_fallback must be cpu or 503, not {s.tpu_fallback!r}")
    for name in ("max_upload_bytes", "max_pixels", "queue_size", "decode_workers"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name} must be positive")
    if s.memory_budget < 16 * MiB:
        raise ValueError("memory_budget must be at least 16 MiB (16777216 bytes)")
    for name in ("request_timeout", "header_timeout", "body_timeout", "tpu_timeout",
                 "device_check_interval", "worker_restart_base"):  # fmt: skip
        if getattr(s, name) <= 0:
            raise ValueError(f"{name} must be positive")
    if s.worker_restart_max < s.worker_restart_base:
        raise ValueError("worker_restart_max must be at least worker_restart_base")
    if s.retry_after < 0 or s.graceful_timeout < 0:
        raise ValueError("retry_after and graceful_timeout must not be negative")
    if not 0 <= s.port <= 65535:
        raise ValueError(f"port out of range: {s.port}")
