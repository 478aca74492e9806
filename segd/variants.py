"""Model variants: the manifest (data in ``models/*.toml``) and model-file resolution.

A file is found in the models directory, else copied from a mirror (directory or base URL,
``SEGD_MODEL_MIRROR``), else downloaded from the manifest URL or Google Drive (``gdrive_id``,
:mod:`segd.gdrive`) — sha256-verified in every case (a publisher that gave only an md5: the md5
once, then the sha256 pinned at that first verification, :mod:`segd.pins`), written to a
temporary name and renamed into place only once verified, so a crash or a full disk never leaves
a partial or corrupt file where a model is expected.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from segd import pins, settings
from segd.errors import ChecksumMismatch, ModelError, ModelNotFound, UnknownModel
from segd.fsutil import fsync_dir
from segd.labels import Labels, palette_from

log = logging.getLogger("segd")

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_MODELS_DIR = PACKAGE_DIR.parent / "models"
BUILTIN_MANIFEST = PACKAGE_DIR / "data" / "variants.toml"
CHUNK = 1 << 20
GDRIVE_SOURCE = "gdrive:"  # a source "gdrive:<file id>" is fetched through segd.gdrive
MAX_DOWNLOAD = 1 << 30  # bound on a download whose size the manifest does not give

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class FileSpec:
    name: str
    sha256: str  # "" when the publisher gave only an md5: then pinned on first use (segd.pins)
    size: int | None = None
    url: str | None = None
    md5: str | None = None  # the publisher's md5 (checked once, then the sha256 pin rules)
    gdrive_id: str | None = None  # Google Drive file id to download from (segd.gdrive)


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: str
    mean: tuple[float, float, float] = (128.0, 128.0, 128.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    @property
    def hw(self) -> tuple[int, int]:
        if not self.shape:
            raise ValueError("input shape not known yet: the manifest says to read it from the file")
        return int(self.shape[1]), int(self.shape[2])


@dataclass(frozen=True)
class OutputSpec:
    kind: str  # "logits" | "argmax"
    shape: tuple[int, ...]
    dtype: str
    stride: int | None = None
    align_corners: bool = True
    strip_tail: bool = False


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    labels: Labels
    input: InputSpec
    output: OutputSpec
    cpu: FileSpec | None  # None: an Edge-TPU-only file, served on the CPU by ``cpu_fallback``
    edgetpu: FileSpec | None = None
    source: Path | None = None  # manifest file it came from
    cpu_fallback: str | None = None  # variant that serves when this one's Edge TPU file cannot
    #: ``cpu_fallback`` resolved by load_manifest (None when the variant has its own CPU file).
    fallback: Variant | None = field(default=None, compare=False, repr=False)

    def cpu_variant(self) -> Variant:
        """The variant whose CPU file serves this one without an Edge TPU: itself, or the
        declared ``cpu_fallback`` (a different network, e.g. Google's model of the same size)."""
        if self.cpu is not None:
            return self
        if self.fallback is None or self.fallback.cpu is None:
            raise ModelError(f"{self.name}: Edge TPU only, and its cpu_fallback {self.cpu_fallback!r} has no CPU file")
        return self.fallback

    @property
    def tensors_from_file(self) -> bool:
        """The manifest leaves input/output shapes to be read from the file (segd.model_io)."""
        return not self.input.shape or not self.output.shape

    @property
    def n_classes(self) -> int:
        return len(self.labels.names)

    def files(self) -> list[FileSpec]:
        return [f for f in (self.cpu, self.edgetpu) if f is not None]


@dataclass
class Manifest:
    variants: dict[str, Variant] = field(default_factory=dict)
    default: str | None = None
    sources: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # user manifests skipped, and why

    def get(self, name: str | None) -> Variant:
        key = name or self.default
        if key is None:
            raise UnknownModel("no model given and the manifest names no default")
        try:
            return self.variants[key]
        except KeyError:
            known = ", ".join(sorted(self.variants)) or "none"
            skipped = f" (skipped: {'; '.join(self.problems)})" if self.problems else ""
            raise UnknownModel(f"unknown model {key!r}; known models: {known}{skipped}") from None


# --- manifest ------------------------------------------------------------------------------


def default_models_dir() -> Path:
    """``SEGD_MODELS_DIR``; else ``models/`` of a source checkout; else the user data dir."""
    env = settings.env_models_dir()
    if env is not None:
        return env
    if (CHECKOUT_MODELS_DIR / "variants.toml").is_file():
        return CHECKOUT_MODELS_DIR
    return settings.user_data_dir() / "segd" / "models"


def builtin_manifest() -> Path:
    """The built-in manifest: ``models/variants.toml`` of a source checkout, else the packaged copy."""
    checkout = CHECKOUT_MODELS_DIR / "variants.toml"
    return checkout if checkout.is_file() else BUILTIN_MANIFEST


def load_manifest(
    paths: Iterable[Path] | None = None, models_dir: Path | None = None
) -> Manifest:
    """Built-in manifest, then every ``*.toml`` in the models dir (user-built variants)."""
    if paths is None:
        builtin = builtin_manifest()
        mdir = models_dir or default_models_dir()
        extra = sorted(p for p in mdir.glob("*.toml") if p.resolve() != builtin.resolve()) if mdir.is_dir() else []
        paths = [builtin, *extra]
    paths = [Path(p) for p in paths]
    manifest = Manifest()
    labels: dict[str, Labels] = {}
    merge_manifest(manifest, labels, paths[0])  # the built-in one must be right
    for path in paths[1:]:
        # A broken user manifest (a half-edited file in the models dir) must not stop the
        # daemon from serving the other variants: it is skipped and reported.
        try:
            trial, trial_labels = Manifest(dict(manifest.variants), manifest.default), dict(labels)
            merge_manifest(trial, trial_labels, path)
        except ModelError as exc:
            manifest.problems.append(exc.detail)
            log.error("skipping manifest %s", exc.detail)
            continue
        manifest.variants, manifest.default, labels = trial.variants, trial.default, trial_labels
        manifest.sources.append(path)
    _link_fallbacks(manifest)
    return manifest


def _link_fallbacks(manifest: Manifest) -> None:
    """Resolve each ``cpu_fallback`` name to its variant; a variant whose fallback is unknown
    or has no CPU file itself is dropped and reported (it could not run without a TPU)."""
    for name, v in list(manifest.variants.items()):
        if v.cpu_fallback is None:
            continue
        target = manifest.variants.get(v.cpu_fallback)
        if target is None or target.cpu is None:
            manifest.problems.append(f"{v.source}: variants.{name}: cpu_fallback {v.cpu_fallback!r} is not a variant with a CPU file")
            log.error("skipping variant %s", manifest.problems[-1])
            del manifest.variants[name]
            continue
        manifest.variants[name] = replace(v, fallback=target)


def merge_manifest(manifest: Manifest, labels: dict[str, Labels], path: Path) -> None:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelError(f"cannot read manifest {path}: {exc}") from exc
    for lname, table in data.get("labels", {}).items():
        labels[lname] = _labels(table, f"{path}: labels.{lname}")
    for vname, table in data.get("variants", {}).items():
        manifest.variants[vname] = _variant(vname, table, labels, path)
    if "default" in data:
        manifest.default = str(data["default"])
    manifest.sources.append(path)


def _labels(table: dict[str, Any], where: str) -> Labels:
    names = table.get("names")
    if not isinstance(names, list) or not names:
        raise ModelError(f"{where}: 'names' must be a non-empty list")
    return Labels(names=tuple(str(n) for n in names), palette=palette_from(table.get("palette", "voc")))


def _variant(name: str, t: dict[str, Any], labels: dict[str, Labels], path: Path) -> Variant:
    where = f"{path}: variants.{name}"
    try:
        lab = t["labels"]
        lab_obj = _labels(lab, where) if isinstance(lab, dict) else labels[str(lab)]
        i, o, files = t["input"], t["output"], t["files"]
        output = OutputSpec(
            kind=str(o["kind"]),
            shape=tuple(int(x) for x in o.get("shape", ())),
            dtype=str(o.get("dtype", "")),
            stride=int(o["stride"]) if "stride" in o else None,
            align_corners=bool(o.get("align_corners", True)),
            strip_tail=bool(o.get("strip_tail", False)),
        )
        if output.kind not in ("logits", "argmax"):
            raise ModelError(f"{where}: output.kind must be 'logits' or 'argmax', not {output.kind!r}")
        if "cpu" not in files and not ("edgetpu" in files and t.get("cpu_fallback")):
            raise ModelError(f"{where}: needs files.cpu, or files.edgetpu and a cpu_fallback variant")
        return Variant(
            name=name,
            description=str(t.get("description", "")),
            labels=lab_obj,
            input=InputSpec(
                shape=tuple(int(x) for x in i.get("shape", ())),
                dtype=str(i.get("dtype", "")),
                mean=_triple(i.get("mean", 128.0)),
                std=_triple(i.get("std", 128.0)),
            ),
            output=output,
            cpu=_file(files["cpu"]) if "cpu" in files else None,
            edgetpu=_file(files["edgetpu"]) if "edgetpu" in files else None,
            source=path,
            cpu_fallback=str(t["cpu_fallback"]) if t.get("cpu_fallback") else None,
        )
    except KeyError as exc:
        raise ModelError(f"{where}: missing key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: {exc}") from None


def _triple(v: Any) -> tuple[float, float, float]:
    vals = [float(v)] * 3 if isinstance(v, int | float) else [float(x) for x in v]
    if len(vals) != 3:
        raise ValueError(f"expected 3 values, got {vals}")
    return vals[0], vals[1], vals[2]


def _file(t: dict[str, Any]) -> FileSpec:
    sha256, md5 = str(t.get("sha256", "")).lower(), str(t.get("md5", "")).lower() or None
    if not sha256 and not md5:
        raise ValueError(f"file {t.get('name')!r}: give its sha256 (or at least the publisher's md5)")
    if sha256 and not _HEX64.fullmatch(sha256):
        raise ValueError(f"file {t.get('name')!r}: sha256 must be 64 hex digits")
    if md5 and not _HEX32.fullmatch(md5):
        raise ValueError(f"file {t.get('name')!r}: md5 must be 32 hex digits")
    return FileSpec(
        name=str(t["name"]),
        sha256=sha256,
        size=int(t["size"]) if "size" in t else None,
        url=str(t["url"]) if t.get("url") else None,
        md5=md5,
        gdrive_id=str(t["gdrive_id"]) if t.get("gdrive_id") else None,
    )


_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


# --- files ---------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_verified(path: Path, spec: FileSpec) -> bytes:
    """Read a model file and check it against the manifest; the bytes returned are the ones
    checked, so nothing can change between verification and load."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelNotFound(f"model file {path} does not exist") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc
    if spec.size is not None and len(data) != spec.size:
        raise ChecksumMismatch(
            f"{path}: size {len(data)} bytes, manifest says {spec.size} "
            "(truncated or wrong file; run `segd models pull --force`)"
        )
    if spec.sha256:
        pins.verify_digests(str(path), spec, path.parent, sha256_bytes(data), None)
    else:  # md5-only publisher checksum: the sha256 pin, else the md5 (then pinned)
        pins.verify_digests(str(path), spec, path.parent, *pins.bytes_digests(data))
    return data


def model_mirror() -> str | None:
    """The mirror when none is passed down: ``SEGD_MODEL_MIRROR``."""
    return settings.env_mirror()


def resolve_file(
    spec: FileSpec,
    models_dir: Path | None = None,
    *,
    mirror: str | None = None,
    download: bool = True,
    force: bool = False,
    progress: ProgressFn | None = None,
    gdrive_url: str | None = None,
) -> Path:
    """Return the path of a verified copy of ``spec`` in the models dir, fetching it if needed."""
    mdir = models_dir or default_models_dir()
    target = mdir / spec.name
    if target.exists() and not force:
        if spec.size is not None and target.stat().st_size != spec.size:
            raise ChecksumMismatch(
                f"{target}: does not match the manifest sha256 {spec.sha256} ({target.stat().st_size} bytes, "
                f"the manifest says {spec.size}: corrupt or replaced file; run `segd models pull --force` "
                "to fetch it again)"
            )
        _verify_file(str(target), target, spec, mdir)
        return target
    mirror = mirror if mirror is not None else model_mirror()
    errors: list[str] = []
    sources: list[str] = []
    if mirror:
        sources.append(_join(mirror, spec.name))
    if download and spec.url:
        sources.append(spec.url)
    if download and spec.gdrive_id:
        sources.append(GDRIVE_SOURCE + spec.gdrive_id)
    if not sources:
        raise ModelNotFound(
            f"model file {spec.name} is not in {mdir} and there is no mirror or URL to fetch it from"
        )
    mdir.mkdir(parents=True, exist_ok=True)
    for src in sources:
        try:
            fetch(src, target, spec, progress=progress, gdrive_url=gdrive_url)
            return target
        except ChecksumMismatch:
            raise
        except (OSError, ValueError) as exc:
            errors.append(f"{src}: {exc}")
    raise ModelNotFound(f"could not fetch {spec.name}: " + "; ".join(errors))


def _join(mirror: str, name: str) -> str:
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(mirror) / name)


def fetch(
    src: str, target: Path, spec: FileSpec, *, progress: ProgressFn | None = None, gdrive_url: str | None = None
) -> None:
    """Copy or download ``src`` to ``target`` via ``target.partial``: resumes a partial download
    (HTTP Range), verifies size and sha256 (or the publisher's md5, then pins the sha256),
    fsyncs, then renames atomically. ``gdrive:<id>`` sources go through :mod:`segd.gdrive`."""
    partial = target.with_name(target.name + ".partial")
    if src.startswith(GDRIVE_SOURCE):
        from segd import gdrive

        base = gdrive_url or settings.env_gdrive_url()
        gdrive.download(src[len(GDRIVE_SOURCE):], partial, base_url=base, progress=progress,
                        max_bytes=spec.size or MAX_DOWNLOAD)  # fmt: skip
    elif "://" not in src:
        if not Path(src).is_file():
            raise FileNotFoundError(f"not in mirror ({src})")
        partial.unlink(missing_ok=True)
        with open(src, "rb") as fin, open(partial, "wb") as fout:
            _copy(fin, fout, spec.size or 0, 0, progress)
            fout.flush()
            os.fsync(fout.fileno())
    else:
        have = partial.stat().st_size if partial.exists() else 0
        if spec.size is not None and have > spec.size:
            partial.unlink()
            have = 0
        req = urllib.request.Request(src, headers={"User-Agent": "segd"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        with urllib.request.urlopen(req, timeout=60) as resp:
            if have and resp.status != 206:
                have = 0  # server ignored the range: start again
            with open(partial, "ab" if have else "wb") as fout:
                _copy(resp, fout, spec.size or 0, have, progress)
                fout.flush()
                os.fsync(fout.fileno())
    size = partial.stat().st_size
    if spec.size is not None and size != spec.size:
        if size > spec.size or "://" not in src:
            partial.unlink(missing_ok=True)
        raise OSError(f"got {size} bytes, expected {spec.size}")
    try:
        _verify_file(src, partial, spec, target.parent)
    except ChecksumMismatch as exc:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{exc.detail}; not installed") from None
    os.replace(partial, target)
    fsync_dir(target.parent)


def _verify_file(where: str, path: Path, spec: FileSpec, models_dir: Path) -> None:
    """Manifest sha256, else the sha256 pin, else the publisher's md5 (see segd.pins)."""
    if spec.sha256:
        pins.verify_digests(where, spec, models_dir, sha256_file(path), None)
    else:
        pins.verify_digests(where, spec, models_dir, *pins.file_digests(path))



def _copy(fin: Any, fout: Any, total: int, done: int, progress: ProgressFn | None) -> None:
    read = getattr(fin, "read1", fin.read)  # what has arrived, so a stall still shows progress
    while chunk := read(CHUNK):
        fout.write(chunk)
        done += len(chunk)
        if progress:
            progress(done, total)


def check_tensor(
    where: str, what: str, shape: Iterable[int], dtype: np.dtype[Any] | type, spec_shape: tuple[int, ...], spec_dtype: str
) -> None:
    """Raise ModelError naming the file and the difference when a tensor does not match."""
    got_shape = tuple(int(x) for x in shape)
    got_dtype = np.dtype(dtype).name
    problems = []
    if got_shape != tuple(spec_shape):
        problems.append(f"shape {list(got_shape)} != manifest {list(spec_shape)}")
    if got_dtype != spec_dtype:
        problems.append(f"dtype {got_dtype} != manifest {spec_dtype}")
    if problems:
        raise ModelError(f"{where}: {what} tensor " + ", ".join(problems))
