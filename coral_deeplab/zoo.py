"""The model zoo: publish an exported ``.tflite`` into a segd models directory, build the
pretrained PASCAL VOC exports, and open published or precompiled models ready to segment.

A published model is three files in the models directory, which ``segd`` picks up because
:func:`segd.variants.load_manifest` reads every ``*.toml`` there:

* ``<name>.tflite`` — the CPU file (int8, raw RGB bytes in, logits out);
* ``<name>_edgetpu.tflite`` — its ``edgetpu_compiler`` output, when the compiler is on PATH;
* ``<name>.toml`` — the manifest entry ``[variants.<name>]``: input/output tensors read off the
  file, sha256 + size of each file, labels inline, and a ``build`` table of provenance.

Everything here except :func:`pascal_export` / :func:`build` is TensorFlow-free, so a Pi can
publish a file exported elsewhere and :func:`from_precompiled` never imports TensorFlow.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import importlib.util
import itertools
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segd import geometry
from segd.errors import SegdError
from segd.fsutil import atomic_write
from segd.tflite.checker import CheckReport, check_model
from segd.tflite.compiler import (
    COMPILER,
    CompileLog,
    compile_edgetpu,
)
from segd.tflite.model import read_model, subgraph_inputs, subgraph_outputs

if TYPE_CHECKING:
    from segd.engine import Segmenter

__all__ = [
    "PascalExport",
    "PublishError",
    "PublishResult",
    "build",
    "default_build_name",
    "describe_report",
    "export_cache_key",
    "from_precompiled",
    "output_geometry",
    "pascal_export",
    "publish",
    "require_tensorflow",
    "toml_dumps",
]

#: A variant name is also a file stem: letters, digits, '_', '-', '.'; no path separators.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
#: Modules whose code decides what an export contains (part of the export cache key): the
#: builders, the weight import and the flatbuffer reader it uses, the converter settings, and
#: segd's decoder/resize that calibration images go through.
_EXPORT_CODE = (
    "coral_deeplab.applications",
    "coral_deeplab.layers",
    "coral_deeplab.weights",
    "segd.tflite.model",
    "coral_deeplab.export",
    "segd.preprocess",
)
_VARIANTS = ("v3", "v3plus")


class PublishError(SegdError, ValueError):
    """The model cannot be published as asked (bad name, shapes, labels, name taken...)."""

    code = "publish_failed"
    http_status = 422


@dataclass(frozen=True)
class PublishResult:
    manifest_path: Path
    cpu_path: Path
    edgetpu_path: Path | None
    #: Static Edge TPU op-mapping prediction for the CPU file.
    report: CheckReport
    #: ``edgetpu_compiler``'s own report, when it ran.
    compile_log: CompileLog | None
    #: Why there is no Edge TPU file (compiler not on PATH, or compile=False); None if there is.
    compile_skipped_reason: str | None


# --- TOML --------------------------------------------------------------------------------
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(value: str) -> str:
    """A TOML basic string: quote, backslash and every control character escaped."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"lone surrogate U+{code:04X} cannot be written to TOML")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"TOML keys must be non-empty strings, got {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"cannot write non-finite float {f!r}")
        return repr(f)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def toml_dumps(data: Mapping[str, Any], *, header: str = "") -> str:
    """Serialise nested mappings of str/int/float/bool/lists to TOML, every string escaped.

    Mappings become ``[dotted.table]`` sections (scalars of a table first, then its sub-tables);
    lists of tables are not supported. ``header`` (trusted text) is emitted as ``#`` comments.
    Round-trips through :func:`tomllib.loads`.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []

    def table(path: list[str], mapping: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in mapping.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in mapping.items() if isinstance(v, Mapping)]
        if path and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables:
            table([*path, k], v)

    table([], data)
    return "\n".join(lines) + "\n"


# --- files ---------------------------------------------------------------------------------


def _file_entry(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# --- geometry ------------------------------------------------------------------------------


def output_geometry(input_hw: tuple[int, int], logits_hw: tuple[int, int]) -> tuple[int, bool]:
    """(stride, align_corners) relating a logits grid to the model input — the rule of
    :func:`segd.geometry.output_geometry` (16k+1 inputs, ``N - 1 = s (n - 1)``, always
    align-corners), raising PublishError for a grid that does not fit it."""
    try:
        return geometry.output_geometry(input_hw, logits_hw)
    except ValueError as exc:
        raise PublishError(str(exc)) from None


# --- publish -------------------------------------------------------------------------------


def _triple(name: str, value: Sequence[float] | float) -> list[float]:
    vals = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise PublishError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
    if name == "std" and any(v == 0 for v in vals):
        raise PublishError("std must not be zero")
    return vals


def _palette(palette: str | Sequence[Sequence[int]]) -> str | list[list[int]]:
    from segd.errors import ModelError
    from segd.labels import palette_from

    try:
        palette_from(palette)  # the same validation the manifest loader applies
    except ModelError as exc:
        raise PublishError(exc.detail) from None
    if isinstance(palette, str):
        return palette.lower()
    return [[int(c) for c in rgb] for rgb in palette]


def describe_report(report: CheckReport) -> str:
    """One line: how many ops map and where the Edge TPU segment stops."""
    text = f"{report.n_mapped}/{report.n_ops} ops mapped to the Edge TPU"
    if report.stop_index is not None:
        how = "does not map" if report.stop_certain else "may not map"
        text += f"; op {report.stop_index} ({report.rows[report.stop_index].op}) {how}"
    return text


def publish(
    tflite: bytes,
    *,
    name: str,
    labels: Sequence[str],
    palette: str | Sequence[Sequence[int]] = "voc",
    models_dir: Path | None = None,
    description: str = "",
    mean: Sequence[float] | float = (128, 128, 128),
    std: Sequence[float] | float = (128, 128, 128),
    compile: bool = True,
    build_info: Mapping[str, str | int | float | bool] | None = None,
) -> PublishResult:
    """Install an exported logits ``.tflite`` as segd variant ``name`` in ``models_dir``.

    The file must have one ``[1, H, W, 3]`` input and one ``[1, h, w, len(labels)]`` logits
    output (strip a resize/argmax tail first with :mod:`segd.tflite.surgery`). Writes
    ``<name>.tflite``, ``<name>_edgetpu.tflite`` when ``compile`` and ``edgetpu_compiler`` is on
    PATH, and last ``<name>.toml`` — each atomically (temporary file, fsync, rename), so no
    file is ever partial and a new variant only exists once its manifest does. Re-publishing a
    name replaces its files; a crash between the model and the manifest rename leaves a sha256
    mismatch that segd refuses to load, never a wrong model. Re-publishing without an Edge TPU
    file deletes the old ``<name>_edgetpu.tflite`` (after the new manifest is in place). A name
    another manifest already defines (Google's built-in variants, another ``.toml``) is refused.

    ``mean``/``std`` describe the float input the network expects, ``(pixel - mean) / std``;
    the default matches :func:`coral_deeplab.export.to_tflite` (raw bytes, scale 1/128, zero
    point 128). A compiler error raises ``EdgeTpuCompileFailed`` and nothing is written.
    """
    from segd.variants import default_models_dir, load_manifest

    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise PublishError(
            f"model name {name!r} must match {NAME_PATTERN.pattern} (it is also a file name)"
        )
    names = [str(n) for n in labels]
    if not names:
        raise PublishError("labels must name at least one class")
    mean_v, std_v = _triple("mean", mean), _triple("std", std)
    palette_v = _palette(palette)
    mdir = Path(models_dir) if models_dir is not None else default_models_dir()

    try:
        model = read_model(tflite)
    except ValueError as exc:
        raise PublishError(str(exc)) from None
    inputs, outputs = subgraph_inputs(model), subgraph_outputs(model)
    if len(inputs) != 1 or len(outputs) != 1:
        raise PublishError(f"expected 1 input and 1 output, found {len(inputs)} and {len(outputs)}")
    inp, out = inputs[0], outputs[0]
    if len(inp.shape) != 4 or inp.shape[0] != 1 or inp.shape[3] != 3 or inp.is_dynamic:
        raise PublishError(f"input must be a static [1, H, W, 3] image, got {list(inp.shape)}")
    if len(out.shape) != 4 or out.shape[0] != 1 or out.is_dynamic:
        raise PublishError(
            f"output must be static [1, h, w, classes] logits, got {list(out.shape)}; a model "
            "ending in RESIZE_BILINEAR/ARG_MAX needs segd.tflite.surgery.strip_tail first"
        )
    if out.shape[3] != len(names):
        raise PublishError(
            f"the model outputs {out.shape[3]} classes but {len(names)} labels were given"
        )
    in_dtype, out_dtype = inp.dtype, out.dtype
    if in_dtype is None or out_dtype is None:
        raise PublishError(f"unsupported tensor types {inp.type_name} / {out.type_name}")
    stride, align_corners = output_geometry(
        (inp.shape[1], inp.shape[2]), (out.shape[1], out.shape[2])
    )

    mdir.mkdir(parents=True, exist_ok=True)
    manifest_path = mdir / f"{name}.toml"
    existing = load_manifest(models_dir=mdir).variants.get(name)
    if existing is not None and (
        existing.source is None or existing.source.resolve() != manifest_path.resolve()
    ):
        raise PublishError(
            f"variant {name!r} is already defined by {existing.source}; pick another name"
        )

    report = check_model(tflite)
    cpu_name, tpu_name = f"{name}.tflite", f"{name}_edgetpu.tflite"
    compiled: bytes | None = None
    compile_log: CompileLog | None = None
    skipped: str | None = None
    if not compile:
        skipped = "not requested (compile=False)"
    elif shutil.which(COMPILER) is None:
        skipped = (
            f"{COMPILER} is not on PATH (it exists only for x86-64 Linux, from Coral's apt "
            "repository); compile the CPU file on such a host and publish again"
        )
    else:
        with tempfile.TemporaryDirectory(prefix="cdl-compile-") as tmp:
            src = Path(tmp) / cpu_name
            src.write_bytes(tflite)
            result = compile_edgetpu(src, Path(tmp) / "out")
            compiled = result.model_path.read_bytes()
            compile_log = result.log
        tpu_out = subgraph_outputs(read_model(compiled))
        if (
            len(tpu_out) != 1
            or tpu_out[0].shape != out.shape
            or tpu_out[0].type_name != out.type_name
        ):
            raise PublishError(
                f"the compiled model's output differs from the CPU file's: {tpu_out}"
            )

    info: dict[str, str | int | float | bool] = {
        "tool": "coral_deeplab.zoo.publish",
        "date": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "checker": describe_report(report),
    }
    if compile_log is not None:
        info["compiler"] = compile_log.compiler_version or "unknown version"
        if compile_log.ops_mapped is not None and compile_log.ops_total is not None:
            info["compiler_ops_mapped"] = f"{compile_log.ops_mapped}/{compile_log.ops_total}"
    if skipped is not None:
        info["edgetpu_skipped"] = skipped
    for k, v in (build_info or {}).items():
        info[str(k)] = v

    files: dict[str, Any] = {"cpu": _file_entry(cpu_name, tflite)}
    if compiled is not None:
        files["edgetpu"] = _file_entry(tpu_name, compiled)
    entry = {
        "description": description,
        "labels": {"names": names, "palette": palette_v},
        "input": {
            "shape": list(inp.shape),
            "dtype": in_dtype.name,
            "mean": mean_v,
            "std": std_v,
        },
        "output": {
            "kind": "logits",
            "shape": list(out.shape),
            "dtype": out_dtype.name,
            "stride": stride,
            "align_corners": align_corners,
            "strip_tail": False,
        },
        "files": files,
        "build": info,
    }
    header = (
        "segd model variant written by coral_deeplab.zoo.publish. The sha256 values must match\n"
        "the files; publish again rather than editing. The input is 16k+1 pixels per side (513),\n"
        "so logit i sits on pixel stride*i: Google's DeepLab geometry, align_corners = true."
    )
    text = toml_dumps({"variants": {name: entry}}, header=header)

    cpu_path = mdir / cpu_name
    atomic_write(cpu_path, tflite)
    tpu_path: Path | None = None
    if compiled is not None:
        tpu_path = mdir / tpu_name
        atomic_write(tpu_path, compiled)
    atomic_write(manifest_path, text.encode())
    if compiled is None:
        # A previous publish of this name may have compiled: its Edge TPU file would be a
        # different network now, and no manifest describes it any more.
        (mdir / tpu_name).unlink(missing_ok=True)
    return PublishResult(manifest_path, cpu_path, tpu_path, report, compile_log, skipped)


# --- pretrained exports (need TensorFlow) ---------------------------------------------------

TF_HINT = "needs TensorFlow: pip install 'segd[train]'"


def require_tensorflow(what: str = "building models") -> None:
    """Import TensorFlow and tf_keras now, or raise ImportError saying what to install — so
    a command fails in a second with the fix, not after minutes or with a bare traceback."""
    try:
        import tensorflow  # noqa: F401
        import tf_keras  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{what} {TF_HINT} ({exc})") from exc



@dataclass(frozen=True)
class PascalExport:
    """A built export and what it was built from."""

    tflite: bytes
    cache_path: Path | None
    from_cache: bool
    key: str
    source: str  # Google variant the weights came from
    n_calibration: int


def _module_source(name: str) -> bytes:
    """Source bytes of module ``name``, found without importing it (no TensorFlow)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot locate module {name}")
    return Path(spec.origin).read_bytes()


def _code_version() -> str:
    """Hash of the modules that shape an export (:data:`_EXPORT_CODE`) plus the converter
    versions, read from package metadata (TensorFlow is not imported)."""
    h = hashlib.sha256()
    for name in _EXPORT_CODE:
        h.update(name.encode())
        h.update(_module_source(name))
    for dist in ("tensorflow", "tf_keras"):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()


def export_cache_key(
    *,
    source_sha256: str,
    calibration: Sequence[np.ndarray],
    variant: str,
    alpha: float,
    input_size: int,
) -> str:
    """sha256 over everything an export depends on: Google's source file, the calibration
    pixels, the architecture arguments and the code/converter versions (:func:`_code_version`)."""
    h = hashlib.sha256()
    h.update(f"{variant}|{float(alpha)}|{int(input_size)}|{source_sha256}|".encode())
    h.update(_code_version().encode())
    for image in calibration:
        arr = np.ascontiguousarray(image)
        h.update(f"{arr.shape}|{arr.dtype}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _check_args(variant: str, alpha: float, input_size: int) -> None:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    geometry.check_alpha(alpha)
    geometry.check_side(input_size, "input size")


def pascal_export(
    *,
    variant: str = "v3",
    alpha: float = 1.0,
    input_size: int = 513,
    calibration: str | os.PathLike[str] | Iterable[np.ndarray],
    num_calibration: int = 32,
    models_dir: Path | None = None,
    mirror: str | None = None,
    cache: Path | bool | None = None,
) -> PascalExport:
    """int8 export of CoralDeepLabV3/V3Plus with ``weights='pascal_voc'``, cached on disk.

    The cache (``cache=None``: ``<coral_deeplab cache dir>/exports``; a Path: there; False: off)
    is keyed by :func:`export_cache_key`, so a cached file is reused only for the same Google
    source file, the same calibration pixels, the same arguments and the same code and
    converter versions. A hit does not import TensorFlow (its version, part of the key, is read
    from package metadata, so TensorFlow must still be installed to match a key built with
    it). Writes are atomic.
    """
    from coral_deeplab import export, weights

    _check_args(variant, alpha, input_size)
    if num_calibration < 1:
        raise ValueError("num_calibration must be >= 1")
    images = list(itertools.islice(export.load_calibration_images(calibration), num_calibration))
    if not images:
        raise ValueError("no calibration images")
    source, data = weights.source_model(alpha, models_dir=models_dir, mirror=mirror)
    key = export_cache_key(
        source_sha256=hashlib.sha256(data).hexdigest(), calibration=images,
        variant=variant, alpha=alpha, input_size=input_size,
    )  # fmt: skip
    cache_path: Path | None = None
    if cache is not False:
        root = cache if isinstance(cache, Path) else weights.cache_dir() / "exports"
        tag = "1" if float(alpha) == 1.0 else "05"
        cache_path = root / f"{variant}-dm{tag}-{input_size}-{key[:16]}.tflite"
        if cache_path.is_file():
            return PascalExport(cache_path.read_bytes(), cache_path, True, key, source, len(images))

    from coral_deeplab import applications

    builder = applications.CoralDeepLabV3 if variant == "v3" else applications.CoralDeepLabV3Plus
    model = builder((input_size, input_size, 3), alpha=float(alpha), n_classes=21)
    weights.load_pascal_voc(model, alpha=float(alpha), skip_logits=variant != "v3",
                            models_dir=models_dir, mirror=mirror)  # fmt: skip
    tflite = export.to_tflite(model, images, num_calibration=len(images))
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_path, tflite)
        except OSError:
            cache_path = None  # a read-only cache only costs a rebuild next time
    return PascalExport(tflite, cache_path, False, key, source, len(images))


def default_build_name(variant: str, alpha: float, input_size: int) -> str:
    """``cdl_v3_dm05_513_pascal`` and the like."""
    tag = "1" if float(alpha) == 1.0 else "05"
    return f"cdl_{variant}_dm{tag}_{input_size}_pascal"


def build(
    *,
    variant: str = "v3",
    alpha: float = 1.0,
    input_size: int = 513,
    calibration: str | os.PathLike[str] | Iterable[np.ndarray],
    name: str | None = None,
    models_dir: Path | None = None,
    mirror: str | None = None,
    num_calibration: int = 32,
    compile: bool = True,
    cache: Path | bool | None = None,
) -> tuple[PascalExport, PublishResult]:
    """Pretrained import -> int8 export -> check -> compile when possible -> publish.

    ``variant='v3plus'`` publishes a model whose decoder and logits are untrained (Google
    published no v3+ mobile PASCAL model; only the encoder is imported): a starting point for
    training, whose masks are meaningless until it is trained. The description says so.
    """
    from segd.variants import load_manifest

    _check_args(variant, alpha, input_size)
    name = name or default_build_name(variant, alpha, input_size)
    if not NAME_PATTERN.fullmatch(name):
        raise PublishError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
    built = pascal_export(
        variant=variant, alpha=alpha, input_size=input_size, calibration=calibration,
        num_calibration=num_calibration, models_dir=models_dir, mirror=mirror, cache=cache,
    )  # fmt: skip
    source = load_manifest(models_dir=models_dir).get(built.source)
    arch = "DeepLab v3" if variant == "v3" else "DeepLab v3+"
    description = (
        f"coral_deeplab {arch}, MobileNetV2 depth multiplier {float(alpha)}, "
        f"{input_size}x{input_size}, PASCAL VOC weights imported from {built.source}, "
        f"int8 export calibrated on {built.n_calibration} images"
    )
    if variant == "v3plus":
        description += "; ONLY THE ENCODER IS PRETRAINED: decoder and logits are untrained"
    result = publish(
        built.tflite, name=name, labels=source.labels.names, palette="voc",
        models_dir=models_dir, description=description, compile=compile,
        build_info={
            "architecture": variant, "alpha": float(alpha), "input_size": input_size,
            "weights": f"pascal_voc ({built.source})", "calibration_images": built.n_calibration,
            "export_key": built.key,
        },
    )  # fmt: skip
    return built, result


# --- open ------------------------------------------------------------------------------------


def from_precompiled(
    name_or_path: str | os.PathLike[str],
    *,
    models_dir: Path | None = None,
    mirror: str | None = None,
    device: str | None = None,
    accelerator: str = "auto",
) -> Segmenter:
    """A ready :class:`segd.engine.Segmenter` for a variant name or a ``.tflite`` path — the
    resolver :func:`segd.resolve.open_segmenter` under the name the original coral-deeplab used.

    Unlike the original ``from_precompiled``, which downloaded a compiled ``_edgetpu.tflite``
    and returned its path for a pycoral interpreter (Edge TPU only, md5 from Google Drive), this
    returns the whole pipeline — preprocessing, invoke, exact upsample + argmax at the original
    image size — on CPU or Edge TPU, sha256-verified, and never imports TensorFlow:
    ``from_precompiled("cdl_v3_dm05_513_pascal").segment(jpeg_bytes).mask``.
    """
    from segd.resolve import open_segmenter

    return open_segmenter(
        name_or_path, models_dir=models_dir, mirror=mirror, device=device, accelerator=accelerator
    )
