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
#: Google Drive's download endpoint (files a manifest gives a ``gdrive_id``, segd.gdrive).
DEFAULT_GDRIVE_URL = "https://drive.google.com/uc"
#: Which libedgetpu/runtime pairs the Edge TPU worker loads: known-good ones only, or any.
EDGETPU_PAIRINGS = ("check", "trust")
#: How a camera is read: an ffmpeg subprocess, HTTP multipart, or a polled still image.
SOURCE_KINDS = ("rtsp", "mjpeg", "snapshot")
#: When class areas go to MQTT: when they change, or every `interval` seconds.
MQTT_MODES = ("change", "interval")


@dataclass
class SourceSettings:
    """One camera, from a ``[sources.NAME]`` table of the settings file. Only these URLs are
    ever fetched: no request parameter names a URL."""

    name: str
    url: str
    kind: str = ""  # rtsp (an ffmpeg subprocess) | mjpeg (HTTP multipart) | snapshot (HTTP GET, polled)
    fps: float = 1.0  # frames segmented per second at most; newer frames replace a waiting one
    model: str | None = None  # default: the default model
    keep_aspect: bool = False
    timeout: float = 10.0  # seconds to connect and between two frames before reconnecting
    reconnect_base: float = 1.0  # seconds before the first reconnect, doubled per failure
    reconnect_max: float = 30.0
    thresholds: dict[str, float] = field(default_factory=dict)  # class label -> percent: MQTT binary sensors

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = "rtsp" if self.url.lower().startswith(("rtsp://", "rtsps://")) else "mjpeg"


@dataclass
class MqttSettings:
    """The MQTT broker to publish class areas to (a ``[mqtt]`` table; ``SEGD_MQTT_*`` overrides)."""

    host: str = ""
    port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id: str = "segd"
    topic_prefix: str = "segd"
    discovery: bool = True  # Home Assistant MQTT discovery messages (retained)
    discovery_prefix: str = "homeassistant"
    mode: str = "change"  # change: when a class area changed (at precision) | interval: every `interval` s
    interval: float = 5.0
    precision: int = 1  # decimals of the published percentages
    keepalive: int = 60

@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    models_dir: Path | None = None
    # directory or base URL to fetch missing model files from
    mirror: str | None = field(default=None, metadata={"env": "SEGD_MODEL_MIRROR", "deprecated_env": "SEGD_MIRROR"})
    gdrive_url: str = DEFAULT_GDRIVE_URL  # Google Drive download endpoint (segd.gdrive)
    models: list[str] = field(default_factory=list)  # variants to serve (default: the default one)
    default_model: str | None = None  # default: the manifest's default (or the first served)
    accelerator: str = "auto"  # auto | cpu | edgetpu
    device: str | None = None  # Edge TPU device (usb, usb:0, pci:0, ...)
    devices: list[str] = field(default_factory=list)  # several Edge TPUs: ["usb:0", "pci:0"] or ["all"]
    # Bench only: when the loaded libedgetpu is segd's latency simulator (it says so in its
    # version string), its TPU-vs-CPU self-test disagreement is recorded but not enforced.
    # No effect with any real libedgetpu.
    relax_simulated_tpu_selftest: bool = False
    runtime: str | None = None  # litert | tflite_runtime (default: the first installed)
    edgetpu_library: str | None = None  # libedgetpu to load (default: the loader finds libedgetpu.so.1)
    threads: int | None = None  # CPU interpreter threads (None or 0: the runtime's default)
    api_key: str | None = None
    insecure: bool = False  # allow a non-loopback bind without an API key
    max_upload_bytes: int = 20 * MiB
    max_pixels: int = DEFAULT_MAX_PIXELS
    queue_size: int = 0  # optional hard cap on requests admitted per variant; 0: admit by expected wait only
    upload_budget_bytes: int = 64 * MiB  # request bodies held in memory at once, all requests; more -> 503
    memory_budget: int = 448 * MiB  # bytes all requests in process may take at once (charged from each header); more wait, a request over it alone gets 413
    request_timeout: float = 30.0  # seconds for the whole pipeline of one request
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive (slow clients get 408)
    body_timeout: float = 60.0  # seconds for a request's body to arrive after its headers (408)
    min_upload_rate: float = 1024.0  # bytes/s an upload must average after header_timeout s (408); 0: off
    max_connections: int = 512  # open connections; over it the longest-idle one is closed
    max_header_bytes: int = 64 * 1024  # request line + headers (431)
    retry_after: int = 1  # seconds, sent with 503 overloaded
    tpu_isolation: bool = True  # run Edge TPU interpreters in a supervised worker process
    decode_isolation: bool = True  # decode images in supervised worker processes (a decoder crash costs one request)
    decode_workers: int = 2  # image decode processes (each ~25 MB of its own; decodes run in parallel up to this)
    edgetpu_python: str | None = None  # Python (numpy + TFLite runtime) the Edge TPU worker runs under
    edgetpu_pairing: str = "check"  # check: only libedgetpu/runtime pairs known good | trust: load anyway
    edgetpu_pairings: Path | None = None  # extra pairings table (format of segd/data/edgetpu_pairings.toml)
    tpu_fallback: str = "cpu"  # when the TPU worker dies: "cpu" (serve on the CPU twin) | "503"
    device_check_interval: float = 5.0  # seconds between Edge TPU presence checks
    tpu_timeout: float = 5.0  # seconds for one Edge TPU invoke; a hung TPU worker is killed and restarted
    tpu_pipeline: int = 2  # requests each Edge TPU worker holds at once (1: no pipelining)
    worker_restart_base: float = 0.5  # seconds, doubled per consecutive crash
    worker_restart_max: float = 30.0
    graceful_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    watchdog: bool = True  # systemd watchdog pings when NOTIFY_SOCKET/WATCHDOG_USEC are set
    log_level: str = "info"
    access_log: bool = True  # one line per HTTP request (logger segd.access, level info)
    test_hooks: bool = False  # enables /debug routes used by the test suite only
    sources: dict[str, SourceSettings] = field(default_factory=dict)  # [sources.NAME] tables (file only)
    mqtt: MqttSettings | None = None  # [mqtt] table; SEGD_MQTT_<FIELD> overrides

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
_TABLES = ("sources", "mqtt")  # nested tables of the file, not single values
_SOURCE_TYPES = typing.get_type_hints(SourceSettings)
_MQTT_TYPES = typing.get_type_hints(MqttSettings)


def _env_names(name: str) -> tuple[str, str | None]:
    """(environment name, deprecated alias or None) of a setting."""
    meta = _FIELDS[name].metadata
    return meta.get("env", "SEGD_" + name.upper()), meta.get("deprecated_env")


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


def _table_value(where: str, kind: Any, value: Any) -> Any:
    if isinstance(value, dict | list) and typing.get_origin(kind) is not dict:
        raise ConfigError(f"{where}: expected a value, not a {type(value).__name__}")
    try:
        if typing.get_origin(kind) is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table (label = number)")
            return {str(k): float(v) for k, v in value.items()}
        return _convert(kind, value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _source(name: str, table: Any) -> SourceSettings:
    where = f"sources.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table ([sources.{name}] with url = ...)")
    values: dict[str, Any] = {}
    for key, value in table.items():
        fname = key.replace("-", "_")
        if fname not in _SOURCE_TYPES or fname == "name":
            raise ConfigError(f"{where}: unknown setting {key!r}")
        values[fname] = _table_value(f"{where}.{key}", _SOURCE_TYPES[fname], value)
    if not values.get("url"):
        raise ConfigError(f"{where} needs a url")
    return SourceSettings(name=name, **values)


def _mqtt(table: Any, env: Mapping[str, str]) -> MqttSettings | None:
    """The [mqtt] table with ``SEGD_MQTT_<FIELD>`` on top; None without a host."""
    if not isinstance(table, dict):
        raise ConfigError("mqtt must be a table ([mqtt] with host = ...)")
    values: dict[str, Any] = {}
    for key, value in table.items():
        fname = key.replace("-", "_")
        if fname not in _MQTT_TYPES:
            raise ConfigError(f"mqtt: unknown setting {key!r}")
        values[fname] = _table_value(f"mqtt.{key}", _MQTT_TYPES[fname], value)
    for fname, kind in _MQTT_TYPES.items():
        raw = env.get("SEGD_MQTT_" + fname.upper())
        if raw is not None:
            values[fname] = _table_value(f"SEGD_MQTT_{fname.upper()}", kind, raw)
    return MqttSettings(**values) if values.get("host") else None


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    values: dict[str, Any] = {}
    tables: dict[str, Any] = {}
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
            if name in _TABLES:
                tables[name] = value
                continue
            values[name] = _coerce(name, value)
    env = os.environ if env is None else env
    try:
        sources = tables.get("sources", {})
        if not isinstance(sources, dict):
            raise ConfigError("sources must be tables: [sources.NAME] with url = ...")
        values["sources"] = {str(n): _source(str(n), t) for n, t in sources.items()}
        values["mqtt"] = _mqtt(tables.get("mqtt", {}), env)
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc.detail}" if config is not None else exc.detail) from None
    for name in _FIELDS:
        if name in _TABLES:
            continue
        raw = _env_value(env, name)
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if value is not None and name not in _TABLES:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """ConfigError naming the first setting out of range."""
    check_accelerator(s.accelerator)
    if s.edgetpu_pairing not in EDGETPU_PAIRINGS:
        raise ConfigError(f"edgetpu_pairing must be {' or '.join(EDGETPU_PAIRINGS)}, not {s.edgetpu_pairing!r}")
    if s.devices and s.device:
        raise ConfigError("set device (one Edge TPU) or devices (several), not both")
    if "all" in s.devices and s.devices != ["all"]:
        raise ConfigError(f"devices: 'all' cannot be combined with named devices: {s.devices}")
    if s.tpu_fallback not in TPU_FALLBACKS:
        raise ConfigError(f"tpu_fallback must be {' or '.join(TPU_FALLBACKS)}, not {s.tpu_fallback!r}")
    if not s.host.strip():
        raise ConfigError("host is empty: set SEGD_HOST (or host in the config file) to an address such as 127.0.0.1")
    for name in ("max_upload_bytes", "max_pixels", "max_connections", "max_header_bytes", "decode_workers"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be positive")
    if s.queue_size < 0 or s.min_upload_rate < 0:
        raise ConfigError("queue_size and min_upload_rate must not be negative (0 turns them off)")
    if s.upload_budget_bytes < s.max_upload_bytes:
        raise ConfigError("upload_budget_bytes must be at least max_upload_bytes (one upload must fit)")
    if s.memory_budget < 16 * MiB:
        raise ConfigError("memory_budget must be at least 16 MiB (16777216 bytes)")
    if s.tpu_pipeline < 1:
        raise ConfigError("tpu_pipeline must be at least 1")
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
    if not s.gdrive_url.startswith(("http://", "https://")):
        raise ConfigError(f"gdrive_url must be an http(s) URL, not {s.gdrive_url!r}")
    for src in s.sources.values():
        validate_source(src)
    if s.mqtt is not None:
        if s.mqtt.mode not in MQTT_MODES:
            raise ConfigError(f"mqtt.mode must be {' or '.join(MQTT_MODES)}, not {s.mqtt.mode!r}")
        if not 0 < s.mqtt.port <= 65535 or s.mqtt.interval <= 0 or not 0 <= s.mqtt.precision <= 4:
            raise ConfigError("mqtt: port within 1..65535, interval positive, precision within 0..4")


def validate_source(src: SourceSettings) -> None:
    where = f"sources.{src.name}"
    if not src.name or not all(c.isalnum() or c in "-_" for c in src.name):
        raise ConfigError(f"{where}: a source name may hold letters, digits, - and _ only")
    if src.kind not in SOURCE_KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(SOURCE_KINDS)}, not {src.kind!r}")
    scheme = src.url.partition("://")[0].lower()
    allowed = ("rtsp", "rtsps", "http", "https") if src.kind == "rtsp" else ("http", "https")
    if scheme not in allowed:
        raise ConfigError(f"{where}: a {src.kind} source needs a {' or '.join(allowed)} URL")
    if not 0 < src.fps <= 60:
        raise ConfigError(f"{where}: fps must be within (0, 60]")
    for name in ("timeout", "reconnect_base"):
        if getattr(src, name) <= 0:
            raise ConfigError(f"{where}: {name} must be positive")
    if src.reconnect_max < src.reconnect_base:
        raise ConfigError(f"{where}: reconnect_max must be at least reconnect_base")
    for label, percent in src.thresholds.items():
        if not 0 <= percent < 100:
            raise ConfigError(f"{where}.thresholds.{label}: a percent within [0, 100)")


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
    """A copy of the process environment (``segd doctor`` layers an env file on top; systemd's
    ``NOTIFY_SOCKET``/``WATCHDOG_*`` and OpenCV's ``OPENCV_IO_*`` limits are read from it)."""
    return dict(os.environ)


def environ_value(name: str) -> str | None:
    """One variable another program defines (OpenCV's ``OPENCV_IO_*`` limits), read as it reads it."""
    return os.environ.get(name)


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


def env_gdrive_url() -> str:
    """``SEGD_GDRIVE_URL`` when set, else Google Drive's endpoint."""
    return _from_env("gdrive_url") or DEFAULT_GDRIVE_URL


def env_runtime() -> str | None:
    """``SEGD_RUNTIME`` when set."""
    return _from_env("runtime")


def env_edgetpu_library() -> str | None:
    """``SEGD_EDGETPU_LIBRARY`` when set."""
    return _from_env("edgetpu_library")
