"""One resolver: a variant name or a ``.tflite`` path -> :class:`~segd.variants.Variant` ->
ready :class:`~segd.engine.Segmenter`.

A name is looked up in the manifest (built-in + every ``*.toml`` in the models dir). A path
must be a file a manifest describes — a published model (``<name>.toml`` beside it) or a known
file matched by sha256 (e.g. Google's under another name) — and is used in place. ``segd eval``
and ``coral_deeplab.from_precompiled`` both come through here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from segd.engine import Segmenter
from segd.errors import ModelNotFound, UnknownModel
from segd.pins import file_digests
from segd.variants import FileSpec, Variant, builtin_manifest, load_manifest, sha256_file

__all__ = ["is_path", "open_segmenter", "variant_for_file"]


def is_path(name_or_path: str | os.PathLike[str]) -> bool:
    """A path (``.tflite`` suffix, a separator, or a PathLike) rather than a variant name."""
    text = os.fspath(name_or_path)
    return isinstance(name_or_path, os.PathLike) or Path(text).suffix == ".tflite" or os.sep in text


def variant_for_file(path: Path, models_dir: Path | None = None) -> Variant:
    """The manifest variant a ``.tflite`` path belongs to: from ``<stem>.toml`` beside it (a
    published model), else any known variant whose file has the same sha256 (e.g. Google's
    file under another name). The variant returned names the file as it is on disk."""
    digest = sha256_file(path)
    candidates: list[Variant] = []
    stem = path.stem[: -len("_edgetpu")] if path.stem.endswith("_edgetpu") else path.stem
    beside = path.with_name(f"{stem}.toml")
    if beside.is_file():
        base = builtin_manifest()
        paths = [base] if beside.resolve() == base.resolve() else [base, beside]
        manifest = load_manifest(paths=paths)
        candidates += [v for v in manifest.variants.values() if v.source == beside]
    candidates += list(load_manifest(models_dir=models_dir).variants.values())
    md5: list[str] = []  # computed once, only if an md5-only entry needs it

    def same(spec: FileSpec) -> bool:
        if spec.sha256:
            return spec.sha256 == digest
        if not md5:
            md5.append(file_digests(path)[1])
        return spec.md5 == md5[0]  # the publisher's md5 (read_verified then pins the sha256)

    for variant in candidates:
        if variant.cpu is not None and same(variant.cpu):
            return replace(variant, cpu=replace(variant.cpu, name=path.name))
        if variant.edgetpu is not None and same(variant.edgetpu):
            # The CPU twin is needed as a fallback; it keeps its manifest name beside it.
            return replace(variant, edgetpu=replace(variant.edgetpu, name=path.name))
    raise UnknownModel(
        f"{path}: no manifest describes this file (sha256 {digest[:12]}…); publish it with "
        "coral_deeplab.zoo.publish, or put its <name>.toml beside it"
    )


def open_segmenter(
    name_or_path: str | os.PathLike[str],
    *,
    models_dir: Path | None = None,
    mirror: str | None = None,
    device: str | None = None,
    accelerator: str = "auto",
    runtime: str | None = None,
    num_threads: int | None = None,
) -> Segmenter:
    """A ready Segmenter for a variant name or a ``.tflite`` path (see the module docstring).

    The file the chosen backend needs is taken from the models dir, else the mirror, else its
    URL — sha256 verified in every case; a path is used in place (nothing is downloaded).
    ``accelerator='auto'`` runs the Edge TPU file when a device and libedgetpu are there, else
    the CPU file (``segmenter.selection.reason`` says why).
    """
    if is_path(name_or_path):
        path = Path(os.fspath(name_or_path))
        if not path.is_file():
            raise ModelNotFound(f"model file {path} does not exist")
        variant = variant_for_file(path, models_dir)
        return Segmenter.open(
            variant, models_dir=path.parent, mirror=mirror, device=device,
            accelerator=accelerator, runtime=runtime, num_threads=num_threads, download=False,
        )  # fmt: skip
    variant = load_manifest(models_dir=models_dir).get(os.fspath(name_or_path))
    return Segmenter.open(
        variant, models_dir=models_dir, mirror=mirror, device=device, accelerator=accelerator,
        runtime=runtime, num_threads=num_threads,
    )  # fmt: skip
