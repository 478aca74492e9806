"""The model manifest — data in ``models/*.toml`` — read **and** written here: the
:class:`Variant` schema, :func:`load_manifest` (built-in + every ``*.toml`` in the models dir),
:func:`variant_table` / :func:`dumps` (the inverse: ``load(dumps(v)) == v``), and
:func:`describe_tflite`, which turns a ``.tflite`` file into a Variant from its own tensors (used
by ``coral_deeplab.zoo.publish``, ``segd eval`` of an undescribed file and the resolver).
Tensor checks against the manifest live here too (:func:`check_tensor`), with one error type,
:class:`~segd.errors.ModelError`. Model *files* (resolution, download, checksums) are
:mod:`segd.variants`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tomli_w

from segd import settings
from segd.errors import GeometryError, ModelError, UnknownModel
from segd.labels import Labels, palette_from, voc_palette

if TYPE_CHECKING:
    from segd.tflite.model import TensorInfo

log = logging.getLogger("segd")

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_MODELS_DIR = PACKAGE_DIR.parent / "models"
BUILTIN_MANIFEST = PACKAGE_DIR / "data" / "variants.toml"
#: Google's DeepLab files and coral_deeplab's exports take raw RGB bytes: (pixel - 128) / 128.
RAW_BYTES_MEAN_STD = (128.0, 128.0, 128.0)


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
    build: Mapping[str, Any] | None = field(default=None, compare=False)  # provenance table
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


# --- load ----------------------------------------------------------------------------------


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
    try:
        return Labels.from_table(table)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc.detail}") from None


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
            build=dict(t["build"]) if isinstance(t.get("build"), dict) else None,
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


# --- dump ----------------------------------------------------------------------------------


def _palette_spec(labels: Labels) -> str | list[list[int]]:
    """The shortest manifest value giving ``labels.palette``: "voc", or the leading colours that
    differ from VOC's (the loader fills the rest with VOC's)."""
    voc = voc_palette(256)
    pal = labels.palette
    differs = np.flatnonzero((pal[:256] != voc[: len(pal)]).any(axis=1))
    if differs.size == 0:
        return "voc"
    return [[int(c) for c in rgb] for rgb in pal[: int(differs[-1]) + 1]]


def _file_table(spec: FileSpec) -> dict[str, Any]:
    table: dict[str, Any] = {"name": spec.name}
    if spec.sha256:
        table["sha256"] = spec.sha256
    if spec.md5:
        table["md5"] = spec.md5
    if spec.size is not None:
        table["size"] = spec.size
    if spec.url:
        table["url"] = spec.url
    if spec.gdrive_id:
        table["gdrive_id"] = spec.gdrive_id
    return table


def variant_table(v: Variant) -> dict[str, Any]:
    """A Variant as its ``[variants.NAME]`` table (labels inline) — what :func:`load_manifest`
    reads back into an equal Variant."""
    # Shapes and dtypes left out (empty) are read from the file at load (segd.model_io).
    output: dict[str, Any] = {"kind": v.output.kind}
    if v.output.shape:
        output["shape"] = list(v.output.shape)
    if v.output.dtype:
        output["dtype"] = v.output.dtype
    if v.output.stride is not None:
        output["stride"] = v.output.stride
    output.update(align_corners=v.output.align_corners, strip_tail=v.output.strip_tail)
    files: dict[str, Any] = {}
    if v.cpu is not None:
        files["cpu"] = _file_table(v.cpu)
    if v.edgetpu is not None:
        files["edgetpu"] = _file_table(v.edgetpu)
    inp: dict[str, Any] = {}
    if v.input.shape:
        inp["shape"] = list(v.input.shape)
    if v.input.dtype:
        inp["dtype"] = v.input.dtype
    inp.update(mean=list(v.input.mean), std=list(v.input.std))
    table: dict[str, Any] = {
        "description": v.description,
        "labels": {"names": list(v.labels.names), "palette": _palette_spec(v.labels)},
        "input": inp,
        "output": output,
        "files": files,
    }  # fmt: skip
    if v.cpu_fallback:
        table["cpu_fallback"] = v.cpu_fallback
    if v.build:
        table["build"] = dict(v.build)
    return table


def _check_writable(value: Any, where: str) -> None:
    """ValueError for what a manifest must not hold: non-finite numbers (TOML can spell them,
    segd cannot use them), lone surrogates, types TOML has no notation for."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"{where}: TOML keys must be non-empty strings, got {k!r}")
            _check_writable(k, where)
            _check_writable(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for v in value:
            _check_writable(v, where)
    elif isinstance(value, str):
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            raise ValueError(f"{where}: a lone surrogate cannot be written to TOML")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: cannot write non-finite float {value!r}")
    elif not isinstance(value, bool | int):
        raise ValueError(f"{where}: cannot write {type(value).__name__} {value!r} as a TOML value")


def dumps(data: Mapping[str, Any], *, header: str = "") -> str:
    """TOML text of a manifest document (``{"variants": {name: variant_table(v)}}``), every
    string escaped by tomli-w; ``header`` (trusted text) becomes ``#`` comment lines."""
    _check_writable(data, "manifest")
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join(lines) + ("\n\n" if lines else "") + tomli_w.dumps(data)


def dump_variant(v: Variant, *, header: str = "") -> str:
    """One variant as a manifest file (``<name>.toml`` in the models dir)."""
    return dumps({"variants": {v.name: variant_table(v)}}, header=header)


# --- describe a .tflite file ------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_model_tensors(model: bytes, where: str) -> tuple[TensorInfo, TensorInfo]:
    """The input and output tensors of a ``.tflite`` that takes one ``[1, H, W, 3]`` image and
    has one output; ModelError starting with ``where`` otherwise. Both describing a new file and
    checking a manifest entry against its file start here."""
    from segd.tflite.model import read_model, subgraph_inputs, subgraph_outputs

    try:
        parsed = read_model(model)
    except ValueError as exc:
        raise ModelError(f"{where}: not a TFLite model: {exc}") from None
    inputs, outputs = subgraph_inputs(parsed), subgraph_outputs(parsed)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{where}: expected 1 input and 1 output tensor, found {len(inputs)} and {len(outputs)}")
    inp, out = inputs[0], outputs[0]
    if len(inp.shape) != 4 or inp.shape[0] != 1 or inp.shape[3] != 3:
        raise ModelError(f"{where}: input {list(inp.shape)} is not a [1, H, W, 3] image")
    return inp, out


def describe_tflite(
    data: bytes,
    *,
    name: str,
    file_name: str,
    labels: Sequence[str] | Labels | None = None,
    mean: Sequence[float] = RAW_BYTES_MEAN_STD,
    std: Sequence[float] = RAW_BYTES_MEAN_STD,
    description: str = "",
    strip_tail: bool | None = False,
    build: Mapping[str, Any] | None = None,
) -> Variant:
    """A Variant for a logits ``.tflite`` file, read off its own tensors: one static
    ``[1, H, W, 3]`` input, one static ``[1, h, w, classes]`` output whose grid is DeepLab's
    (:func:`segd.geometry.output_geometry`: 16k+1 inputs, align-corners). ``strip_tail``: the
    file ends in RESIZE_BILINEAR/ARG_MAX and the description is of the stripped model (the
    manifest then says ``strip_tail = true``); ``None``: strip it when there is one. ``labels=None`` names the classes ``class_<i>``.
    ModelError naming the problem otherwise.
    """
    from segd.geometry import output_geometry
    from segd.tflite.surgery import strip_tail as cut_tail

    body, stripped = data, False
    if strip_tail is not False:
        try:
            body, stripped = cut_tail(data).model_bytes, True
        except ValueError as exc:
            if strip_tail:
                raise ModelError(f"{file_name}: cannot strip the resize/argmax tail: {exc}") from None
    inp, out = image_model_tensors(body, file_name)
    if inp.is_dynamic:
        raise ModelError(f"{file_name}: input must be a static [1, H, W, 3] image, got {list(inp.shape)}")
    if len(out.shape) != 4 or out.shape[0] != 1 or out.is_dynamic:
        raise ModelError(
            f"output must be static [1, h, w, classes] logits, got {list(out.shape)}; a model "
            "ending in RESIZE_BILINEAR/ARG_MAX needs segd.tflite.surgery.strip_tail first (a "
            "class-map output does not say how many classes there are)"
        )
    if inp.dtype is None or out.dtype is None:
        raise ModelError(f"unsupported tensor types {inp.type_name} / {out.type_name}")
    n_classes = int(out.shape[3])
    if labels is None:
        label_set = Labels(tuple(f"class_{i}" for i in range(n_classes)), voc_palette(256))
    else:
        label_set = labels if isinstance(labels, Labels) else Labels(tuple(labels), palette_from("voc"))
        if n_classes != len(label_set):
            raise ModelError(f"the model outputs {n_classes} classes but {len(label_set)} labels were given")
    try:
        stride, aligned = output_geometry((inp.shape[1], inp.shape[2]), (out.shape[1], out.shape[2]))
    except GeometryError as exc:
        raise ModelError(f"cannot tell how its logits map onto the input: {exc.detail}") from None
    return Variant(
        name=name,
        description=description,
        labels=label_set,
        input=InputSpec(tuple(int(x) for x in inp.shape), inp.dtype.name, _triple(mean), _triple(std)),
        output=OutputSpec("logits", tuple(int(x) for x in out.shape), out.dtype.name, stride, aligned, stripped),
        cpu=FileSpec(file_name, sha256_bytes(data), len(data)),
        build=build,
    )


# --- tensor checks ----------------------------------------------------------------------------


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
