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
SOURCE_KINDS = ("rtsp", "mjpeg", "snapshot")
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
    pixels_in_flight: int = 0  # image pixels processed at once, all requests (0: max_pixels); more wait
    request_timeout: float = 30.0  # seconds for the whole pipeline of one request
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive (slow clients get 408)
    body_timeout: float = 60.0  # seconds for a request's body to arrive after its headers (408)
    retry_after: int = 1  # seconds, sent with 503 overloaded
    tpu_isolation: bool = True  # run Edge TPU interpreters in a supervised worker process
    tpu_fallback: str = "cpu"  # when the TPU worker dies: "cpu" (serve on the CPU twin) | "503"
    device_check_interval: float = 5.0  # seconds between Edge TPU presence checks
    tpu_timeout: float = 5.0  # seconds for one Edge TPU invoke; a hung TPU worker is killed and restarted
    worker_restart_base: float = 0.5  # seconds, doubled per consecutive crash
    worker_restart_max: float = 30.0
    graceful_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    watchdog: bool = True  # systemd watchdog pings when NOTIFY_SOCKET/WATCHDOG_USEC are set
    log_level: str = "info"
    access_log: bool = True  # one line per HTTP request (logger segd.access, level info)
    test_hooks: bool = False  # enables /debug routes used by the test suite only
    sources: dict[str, SourceSettings] = field(default_factory=dict)  # [sources.NAME] tables (file only)
    mqtt: MqttSettings | None = None  # [mqtt] table, or SEGD_MQTT_HOST

    def is_loopback(self) -> bool:
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


_FIELDS = {f.name: f for f in fields(Settings)}
_TABLES = ("sources", "mqtt")  # nested tables: from the file (mqtt also from SEGD_MQTT_*)
_SOURCE_FIELDS = {f.name: f for f in fields(SourceSettings)}
_MQTT_FIELDS = {f.name: f for f in fields(MqttSettings)}


def _typed(where: str, spec: dataclasses.Field[Any], value: Any) -> Any:
    """A nested table's value as its field's type (str | None, int, float, bool)."""
    default = spec.default
    kind = type(default) if default is not dataclasses.MISSING and default is not None else str
    if value is None or (value == "" and default is None):
        return None
    try:
        if kind is bool:
            return _coerce_bool(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a value, not a {type(value).__name__}")
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def _source(name: str, table: Any) -> SourceSettings:
    where = f"sources.{name}"
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table ([sources.{name}] with url = ...)")
    values: dict[str, Any] = {}
    for key, value in table.items():
        fname = key.replace("-", "_")
        if fname not in _SOURCE_FIELDS or fname == "name":
            raise ValueError(f"{where}: unknown setting {key!r}")
        if fname == "thresholds":
            if not isinstance(value, dict):
                raise ValueError(f"{where}.thresholds must be a table of class label = percent")
            try:
                values[fname] = {str(k): float(v) for k, v in value.items()}
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}.thresholds: {exc}") from None
        else:
            values[fname] = _typed(f"{where}.{key}", _SOURCE_FIELDS[fname], value)
    if not values.get("url"):
        raise ValueError(f"{where} needs a url")
    return SourceSettings(name=name, **values)


def _mqtt(table: Mapping[str, Any], env: Mapping[str, str]) -> MqttSettings | None:
    values: dict[str, Any] = {}
    for key, value in table.items():
        fname = key.replace("-", "_")
        if fname not in _MQTT_FIELDS:
            raise ValueError(f"mqtt: unknown setting {key!r}")
        values[fname] = _typed(f"mqtt.{key}", _MQTT_FIELDS[fname], value)
    for fname, spec in _MQTT_FIELDS.items():
        raw = env.get("SEGD_MQTT_" + fname.upper())
        if raw is not None:
            values[fname] = _typed(f"SEGD_MQTT_{fname.upper()}", spec, raw)
    if not values.get("host"):
        return None
    return MqttSettings(**values)


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
            return _coerce_bool(value)
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
    tables: dict[str, Any] = {}
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
            if name in _TABLES:
                if not isinstance(value, dict):
                    raise ValueError(f"{config}: {key} must be a table ([{key}...])")
                tables[name] = value
                continue
            values[name] = _coerce(name, value)
    env = os.environ if env is None else env
    try:
        values["sources"] = {str(n): _source(str(n), t) for n, t in tables.get("sources", {}).items()}
        values["mqtt"] = _mqtt(tables.get("mqtt", {}), env)
    except ValueError as exc:
        raise ValueError(f"{config}: {exc}" if config is not None else str(exc)) from None
    for name in _FIELDS:
        if name in _TABLES:
            continue
        raw = env.get("SEGD_" + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if value is not None and name not in _TABLES:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    if s.accelerator not in ("auto", "cpu", "edgetpu"):
        raise ValueError(f"accelerator must be auto, cpu or edgetpu, not {s.accelerator!r}")
    if s.tpu_fallback not in ("cpu", "503"):
        raise ValueError(f"tpu_fallback must be cpu or 503, not {s.tpu_fallback!r}")
    for name in ("max_upload_bytes", "max_pixels", "queue_size"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name} must be positive")
    if s.pixels_in_flight < 0:
        raise ValueError("pixels_in_flight must be 0 (= max_pixels) or positive")
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
    for src in s.sources.values():
        where = f"sources.{src.name}"
        if not src.name or not all(c.isalnum() or c in "-_" for c in src.name):
            raise ValueError(f"{where}: a source name may hold letters, digits, - and _ only")
        if src.kind not in SOURCE_KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(SOURCE_KINDS)}, not {src.kind!r}")
        scheme = src.url.partition("://")[0].lower()
        allowed = ("rtsp", "rtsps", "http", "https") if src.kind == "rtsp" else ("http", "https")
        if scheme not in allowed:
            raise ValueError(f"{where}: a {src.kind} source needs a {' or '.join(allowed)} URL")
        if not 0 < src.fps <= 60:
            raise ValueError(f"{where}: fps must be within (0, 60]")
        for name in ("timeout", "reconnect_base"):
            if getattr(src, name) <= 0:
                raise ValueError(f"{where}: {name} must be positive")
        if src.reconnect_max < src.reconnect_base:
            raise ValueError(f"{where}: reconnect_max must be at least reconnect_base")
        for label, percent in src.thresholds.items():
            if not 0 <= percent < 100:
                raise ValueError(f"{where}.thresholds.{label}: a percent within [0, 100)")
    if s.mqtt is not None:
        if s.mqtt.mode not in MQTT_MODES:
            raise ValueError(f"mqtt.mode must be change or interval, not {s.mqtt.mode!r}")
        if not 0 < s.mqtt.port <= 65535 or s.mqtt.interval <= 0 or not 0 <= s.mqtt.precision <= 4:
            raise ValueError("mqtt: port within 1..65535, interval positive, precision within 0..4")
