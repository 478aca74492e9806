"""One settings object, and the only reader of the environment.

Precedence: defaults < TOML file (``--config`` / ``SEGD_CONFIG``) < ``SEGD_*`` environment <
command-line flags. Each setting has one environment name, ``SEGD_<FIELD>`` unless the field
says otherwise (``mirror`` is ``SEGD_MODEL_MIRROR``; the older ``SEGD_MIRROR`` still works and
warns). Library code that needs an environment default when no settings are passed down (the
models dir, the mirror, the CPU runtime, the libedgetpu path) asks the functions at the end of
this module, so no other module reads ``os.environ``.

This module imports only the standard library: everything may depend on it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segd.errors import ConfigError

if TYPE_CHECKING:
    from segd.variants import Manifest

MiB = 1024 * 1024
#: Pixel limit of one image (declared or decoded): ~ a 7000x5700 photo, 120 MB of RGB.
DEFAULT_MAX_PIXELS = 40_000_000
#: Where a model runs: Edge TPU when usable else CPU, CPU only, or Edge TPU only.
ACCELERATORS = ("auto", "cpu", "edgetpu")
#: What serves when the Edge TPU worker dies.
TPU_FALLBACKS = ("cpu", "503")

@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    models_dir: Path | None = None
    # directory or base URL to fetch missing model files from
    mirror: str | None = field(default=None, metadata={"env": "SEGD_MODEL_MIRROR", "deprecated_env": "SEGD_MIRROR"})
    models: list[str] = field(default_factory=list)  # variants to serve (default: the default one)
    default_model: str | None = None  # default: the manifest's default (or the first served)
    accelerator: str = "auto"  # auto | cpu | edgetpu
    device: str | None = None  # Edge TPU device (usb, usb:0, pci:0, ...)
    runtime: str | None = None  # litert | tflite_runtime (default: the first installed)
    edgetpu_library: str | None = None  # libedgetpu to load (default: the loader finds libedgetpu.so.1)
    threads: int | None = None  # CPU interpreter threads (None or 0: the runtime's default)
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
    decode_workers: int = 2  # image decode processes (each ~25 MB of its own; decodes run in parallel up to this)
    tpu_fallback: str = "cpu"  # when the TPU worker dies: "cpu" (serve on the CPU twin) | "503"
    device_check_interval: float = 5.0  # seconds between Edge TPU presence checks
    tpu_timeout: float = 5.0  # seconds for one Edge TPU invoke; a hung TPU worker is killed and restarted
    worker_restart_base: float = 0.5  # seconds, doubled per consecutive crash
    worker_restart_max: float = 30.0
    graceful_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    watchdog: bool = True  # systemd watchdog pings when NOTIFY_SOCKET/WATCHDOG_USEC are set
    log_level: str = "info"
    test_hooks: bool = False  # enables /debug routes used by the test suite only

    def __post_init__(self) -> None:
        if self.threads == 0:
            self.threads = None  # 0 threads means "the runtime's default", as None does

    def is_loopback(self) -> bool:
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


    def served_models(self, manifest: Manifest) -> tuple[list[str], str]:
        """(variants to serve, the default one) — decided here only. ``models`` (default: the
        default model, else the manifest's default, else its first variant); the default is
        ``default_model``, else the manifest's default when served, else the first served."""
        names = self.models or [self.default_model or manifest.default or next(iter(manifest.variants))]
        default = self.default_model or (manifest.default if manifest.default in names else names[0])
        return names, default


_FIELDS = {f.name: f for f in fields(Settings)}
_TYPES = typing.get_type_hints(Settings)


def _env_names(name: str) -> tuple[str, str | None]:
    """(environment name, deprecated alias or None) of a setting."""
    meta = _FIELDS[name].metadata
    return meta.get("env", "SEGD_" + name.upper()), meta.get("deprecated_env")


def env_name(name: str) -> str:
    """The documented environment variable of setting ``name``."""
    return _env_names(name)[0]


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"not a boolean: {value!r}")
    return bool(value)


def _convert(kind: Any, value: Any) -> Any:
    """``value`` (TOML, environment or flag) as type ``kind``: by the type, never by field name.
    For an optional type an empty string is None; a list from a string is comma-separated."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) and type(None) in args:
        if value is None or value == "":
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value)
    if typing.get_origin(kind) is list:
        items = value.split(",") if isinstance(value, str) else value
        return [str(v).strip() for v in items if str(v).strip()]
    if kind is bool:
        return _to_bool(value)
    if kind in (int, float, str, Path):
        return kind(value)
    raise TypeError(f"no conversion to {kind}")


def _coerce(name: str, value: Any) -> Any:
    """Turn TOML/env/flag values into the field's type, with errors naming the setting."""
    try:
        return _convert(_TYPES[name], value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {exc}") from None


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
            raise ConfigError(f"cannot read config {config}: {exc}") from exc
        data = data.get("segd", data)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"{config}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    env = os.environ if env is None else env
    for name in _FIELDS:
        raw = _env_value(env, name)
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """ConfigError naming the first setting out of range."""
    check_accelerator(s.accelerator)
    if s.tpu_fallback not in TPU_FALLBACKS:
        raise ConfigError(f"tpu_fallback must be {' or '.join(TPU_FALLBACKS)}, not {s.tpu_fallback!r}")
    for name in ("max_upload_bytes", "max_pixels", "queue_size", "decode_workers"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be positive")
    if s.memory_budget < 16 * MiB:
        raise ConfigError("memory_budget must be at least 16 MiB (16777216 bytes)")
    for name in ("request_timeout", "header_timeout", "body_timeout", "tpu_timeout",
                 "device_check_interval", "worker_restart_base"):  # fmt: skip
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if s.worker_restart_max < s.worker_restart_base:
        raise ConfigError("worker_restart_max must be at least worker_restart_base")
    if s.retry_after < 0 or s.graceful_timeout < 0:
        raise ConfigError("retry_after and graceful_timeout must not be negative")
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"port out of range: {s.port}")


def check_accelerator(accelerator: str) -> None:
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"accelerator must be {', '.join(ACCELERATORS[:-1])} or {ACCELERATORS[-1]}, not {accelerator!r}")


# --- the environment --------------------------------------------------------------------------
def _env_value(env: Mapping[str, str], name: str) -> str | None:
    """The raw environment value of setting ``name``; a deprecated alias warns."""
    current, alias = _env_names(name)
    if current in env:
        return env[current]
    if alias is not None and alias in env:
        warnings.warn(f"{alias} is deprecated; use {current}", FutureWarning, stacklevel=3)
        return env[alias]
    return None


def environment() -> dict[str, str]:
    """A copy of the process environment (``segd doctor`` layers an env file on top)."""
    return dict(os.environ)


def _from_env(name: str) -> str | None:
    return _env_value(os.environ, name) or None


def config_path(env: Mapping[str, str] | None = None) -> Path | None:
    """``SEGD_CONFIG``: the TOML settings file, when set."""
    raw = (os.environ if env is None else env).get("SEGD_CONFIG")
    return Path(raw) if raw else None


def env_models_dir() -> Path | None:
    """``SEGD_MODELS_DIR`` when set (see :func:`segd.variants.default_models_dir`)."""
    raw = _from_env("models_dir")
    return Path(raw) if raw else None


def user_data_dir() -> Path:
    """``$XDG_DATA_HOME``, else ``~/.local/share``."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def env_mirror() -> str | None:
    """``SEGD_MODEL_MIRROR`` (or the deprecated ``SEGD_MIRROR``) when set."""
    return _from_env("mirror")


def env_runtime() -> str | None:
    """``SEGD_RUNTIME`` when set."""
    return _from_env("runtime")


def env_edgetpu_library() -> str | None:
    """``SEGD_EDGETPU_LIBRARY`` when set."""
    return _from_env("edgetpu_library")
