"""Publish an exported ``.tflite`` into a segd models directory (TensorFlow-free, so a Pi can
publish a file exported elsewhere).

A published model is three files in the models directory, which ``segd`` picks up because
:func:`segd.manifest.load_manifest` reads every ``*.toml`` there:

* ``<name>.tflite`` — the CPU file (int8, raw RGB bytes in, logits out);
* ``<name>_edgetpu.tflite`` — its ``edgetpu_compiler`` output, when the compiler is on PATH;
* ``<name>.toml`` — the manifest entry ``[variants.<name>]``, written by
  :func:`segd.manifest.dump_variant` from :func:`segd.manifest.describe_tflite` (tensors read
  off the file, sha256 + size of each file, labels inline) plus a ``build`` table of provenance.
"""

from __future__ import annotations

import datetime
import math
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from segd import geometry
from segd.errors import ModelError, SegdError
from segd.fsutil import atomic_write
from segd.labels import Labels, palette_from
from segd.manifest import FileSpec, dump_variant, sha256_bytes
from segd.tflite.checker import CheckReport, check_model
from segd.tflite.compiler import (
    COMPILER,
    CompileLog,
    compile_edgetpu,
)
from segd.tflite.model import read_model, subgraph_outputs

__all__ = ["NAME_PATTERN", "PublishError", "PublishResult", "describe_report", "output_geometry", "publish"]

#: A variant name is also a file stem: letters, digits, '_', '-', '.'; no path separators.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
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
    from segd.manifest import default_models_dir, describe_tflite, load_manifest

    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise PublishError(
            f"model name {name!r} must match {NAME_PATTERN.pattern} (it is also a file name)"
        )
    names = [str(n) for n in labels]
    if not names:
        raise PublishError("labels must name at least one class")
    mean_v, std_v = _triple("mean", mean), _triple("std", std)
    mdir = Path(models_dir) if models_dir is not None else default_models_dir()
    cpu_name, tpu_name = f"{name}.tflite", f"{name}_edgetpu.tflite"
    try:
        label_set = Labels(tuple(names), palette_from(palette))  # the manifest loader's validation
        variant = describe_tflite(
            tflite, name=name, file_name=cpu_name, labels=label_set, mean=mean_v, std=std_v,
            description=description,
        )  # fmt: skip
    except ModelError as exc:
        raise PublishError(exc.detail) from None

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
            or list(tpu_out[0].shape) != list(variant.output.shape)
            or tpu_out[0].dtype is None
            or tpu_out[0].dtype.name != variant.output.dtype
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

    if compiled is not None:
        variant = replace(variant, edgetpu=FileSpec(tpu_name, sha256_bytes(compiled), len(compiled)))
    variant = replace(variant, build=info)
    header = (
        "segd model variant written by coral_deeplab.zoo.publish. The sha256 values must match\n"
        "the files; publish again rather than editing. The input is 16k+1 pixels per side (513),\n"
        "so logit i sits on pixel stride*i: Google's DeepLab geometry, align_corners = true."
    )
    text = dump_variant(variant, header=header)

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


