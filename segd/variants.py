"""Model variants: the manifest (data in ``models/*.toml``) and model-file resolution.

A file is found in the models directory, else copied from a mirror (directory or base URL,
``SEGD_MODEL_MIRROR``), else downloaded from the manifest URL — sha256-verified in every case,
written to a temporary name and renamed into place only once verified, so a crash or a full disk
never leaves a partial or corrupt file where a model is expected.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segd import settings
from segd.errors import ChecksumMismatch, ModelError, ModelNotFound, UnknownModel
from segd.fsutil import fsync_dir
from segd.labels import Labels, palette_from

log = logging.getLogger("segd")

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_MODELS_DIR = PACKAGE_DIR.parent / "models"
BUILTIN_MANIFEST = PACKAGE_DIR / "data" / "variants.toml"
CHUNK = 1 << 20

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class FileSpec:
    name: str
    sha256: str
    size: int | None = None
    url: str | None = None


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: str
    mean: tuple[float, float, float] = (128.0, 128.0, 128.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    @property
    def hw(self) -> tuple[int, int]:
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
    cpu: FileSpec
    edgetpu: FileSpec | None = None
    source: Path | None = None  # manifest file it came from

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
    return manifest


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
            shape=tuple(int(x) for x in o["shape"]),
            dtype=str(o["dtype"]),
            stride=int(o["stride"]) if "stride" in o else None,
            align_corners=bool(o.get("align_corners", True)),
            strip_tail=bool(o.get("strip_tail", False)),
        )
        if output.kind not in ("logits", "argmax"):
            raise ModelError(f"{where}: output.kind must be 'logits' or 'argmax', not {output.kind!r}")
        return Variant(
            name=name,
            description=str(t.get("description", "")),
            labels=lab_obj,
            input=InputSpec(
                shape=tuple(int(x) for x in i["shape"]),
                dtype=str(i["dtype"]),
                mean=_triple(i.get("mean", 128.0)),
                std=_triple(i.get("std", 128.0)),
            ),
            output=output,
            cpu=_file(files["cpu"]),
            edgetpu=_file(files["edgetpu"]) if "edgetpu" in files else None,
            source=path,
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
    return FileSpec(
        name=str(t["name"]),
        sha256=str(t["sha256"]).lower(),
        size=int(t["size"]) if "size" in t else None,
        url=str(t["url"]) if t.get("url") else None,
    )


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
    digest = sha256_bytes(data)
    if digest != spec.sha256:
        raise ChecksumMismatch(
            f"{path}: sha256 {digest}, manifest says {spec.sha256} "
            "(corrupt or replaced file; run `segd models pull --force`)"
        )
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
) -> Path:
    """Return the path of a verified copy of ``spec`` in the models dir, fetching it if needed."""
    mdir = models_dir or default_models_dir()
    target = mdir / spec.name
    if target.exists() and not force:
        if (spec.size is None or target.stat().st_size == spec.size) and sha256_file(target) == spec.sha256:
            return target
        raise ChecksumMismatch(
            f"{target}: does not match the manifest sha256 {spec.sha256} "
            "(corrupt or replaced file; run `segd models pull --force` to fetch it again)"
        )
    mirror = mirror if mirror is not None else model_mirror()
    errors: list[str] = []
    sources: list[str] = []
    if mirror:
        sources.append(_join(mirror, spec.name))
    if download and spec.url:
        sources.append(spec.url)
    if not sources:
        raise ModelNotFound(
            f"model file {spec.name} is not in {mdir} and there is no mirror or URL to fetch it from"
        )
    mdir.mkdir(parents=True, exist_ok=True)
    for src in sources:
        try:
            fetch(src, target, spec, progress=progress)
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


def fetch(src: str, target: Path, spec: FileSpec, *, progress: ProgressFn | None = None) -> None:
    """Copy or download ``src`` to ``target`` via ``target.partial``: resumes a partial download
    (HTTP Range), verifies size and sha256, fsyncs, then renames atomically."""
    partial = target.with_name(target.name + ".partial")
    if "://" not in src:
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
    digest = sha256_file(partial)
    if digest != spec.sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{src}: sha256 {digest}, manifest says {spec.sha256}; not installed")
    os.replace(partial, target)
    fsync_dir(target.parent)


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
