"""The original coral-deeplab's trained PASCAL VOC Keras weights (``.h5``), mapped onto ours.

github.com/xadrianzetx/coral-deeplab (MIT) published, on Google Drive, the weights it trained
for DeepLab v3 (output stride 16) and v3+ (output stride 4), MobileNetV2 depth multiplier 1.0
and 0.5, on PASCAL VOC trainaug — the only mobile v3+ PASCAL weights we know of. The facts
recorded here (file names, Drive ids, md5s) are from its ``coral_deeplab/pretrained.py``
(``KerasModel``) at commit e485684 (2023-01-04); its releases since 0.3 no longer load them
("model unmarshalling between different Python versions": the files are whole saved models
with Python-bytecode ``Lambda`` layers). segd never unpickles them: it reads only the weight
arrays with h5py, by layer name.

Layer names: the original names its layers after Google's checkpoint scopes —
``Conv``, ``expanded_conv/depthwise``, ``expanded_conv_<n>/{expand,depthwise,project}``, each
with a ``<conv>/BatchNorm``, ``aspp0``, ``image_pooling``, ``concat_projection``,
``logits/semantic``; for v3+ ``skip_con_conv``, ``decoder_conv_1``, ``decoder_conv_2``.
:func:`segd_layer_name` maps them onto :mod:`coral_deeplab.applications` (``/`` -> ``_``,
``/BatchNorm`` -> ``_BN``, and the v3+ decoder table :data:`DECODER_NAMES`). The architecture
is ours layer for layer for v3; for v3+ the original's decoder differs from DeepLab's and is
built to match when its weights are loaded (skip taken from ``expanded_conv_3/expand`` after
its ReLU6, two full 3x3 convolutions instead of separable ones). The original trained on images
scaled to 0..1, ours take ``(pixel - 128) / 128``: a ``Rescaling`` layer in front converts
exactly, so everything downstream (export, training, segd) is unchanged.

Everything but :func:`apply_weights` is TensorFlow-free (h5py and numpy only).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coral_deeplab.weights import WeightImportError  # the .h5 and the model disagree
from segd.errors import SegdError

__all__ = [
    "DECODER_NAMES",
    "H5_FILES",
    "ORIGINAL_COMMIT",
    "SOURCES",
    "OriginalFile",
    "WeightsUnavailable",
    "apply_weights",
    "fetch",
    "file_spec",
    "read_h5_weights",
    "segd_layer_name",
]

ORIGINAL_REPO = "https://github.com/xadrianzetx/coral-deeplab"
ORIGINAL_COMMIT = "e485684b10f59ca652eed4f2aca6f14a2a2ebbac"
#: weights= source choices: the original's .h5, Google's Coral .tflite, or the first that works.
SOURCES = ("auto", "coral-deeplab", "google-tflite")


@dataclass(frozen=True)
class OriginalFile:
    name: str
    md5: str
    gdrive_id: str


#: (architecture, depth multiplier) -> the original's file (pretrained.KerasModel).
H5_FILES: dict[tuple[str, float], OriginalFile] = {
    ("v3", 1.0): OriginalFile("deeplabv3_mnv2_dm1_voc_tainaug_os16.h5", "b326724d7e89d8cc7f409edbf1b11105", "1CE7cMfgViNgFxXKbCq0wFXeO8slV0Z01"),
    ("v3", 0.5): OriginalFile("deeplabv3_mnv2_dm05_voc_tainaug_os16.h5", "36e1e957a62848451db92c53abc1d7d7", "1J-8hCUNYxbWgazflv8CGVYgmqoFHxB_N"),
    ("v3plus", 1.0): OriginalFile("deeplabv3plus_mnv2_dm1_voc_trainaug_os4.h5", "c43f0acf3a256daa237da66ecedb4565", "191I3qg-S245BD8aX1jfGF2Yy3H9-1A1l"),
    ("v3plus", 0.5): OriginalFile("deeplabv3plus_mnv2_dm05_voc_trainaug_os4.h5", "e3e002c39716bc54f966bae657fc2f78", "17wv_wRPZMnj2s_y_nol8whkwda0C2O77"),
}  # fmt: skip

#: The original's v3+ decoder layer -> ours (its BatchNorms follow: ``<name>/BatchNorm``).
DECODER_NAMES = {
    "skip_con_conv": "feature_projection0",
    "decoder_conv_1": "decoder_conv0",
    "decoder_conv_2": "decoder_conv1",
}
#: Where the original's v3+ decoder taps the encoder (``expanded_conv_3/expand/relu``).
SKIP_TAP = "expanded_conv_3_expand"
LOGITS = "logits_semantic"


class WeightsUnavailable(SegdError, RuntimeError):
    """The original's weights file could not be fetched or verified (offline, Drive refused)."""

    code = "weights_unavailable"


def segd_layer_name(original: str) -> str:
    """``expanded_conv_3/expand/BatchNorm`` -> ``expanded_conv_3_expand_BN``;
    ``skip_con_conv`` -> ``feature_projection0``; ``logits/semantic`` -> ``logits_semantic``."""
    head, bn, rest = original.partition("/BatchNorm")
    if rest:
        raise WeightImportError(f"unexpected layer name {original!r}")
    base = DECODER_NAMES.get(head, head.replace("/", "_"))
    return base + ("_BN" if bn else "")


def _short(weight_name: str) -> str:
    """``expanded_conv_1/expand/BatchNorm/gamma:0`` -> ``gamma``."""
    return re.sub(r":\d+$", "", weight_name.rsplit("/", 1)[-1])


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_h5_weights(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Weight arrays of a keras ``.h5`` (whole saved model or ``save_weights``), by layer name:
    ``{layer: {"kernel": ..., "gamma": ...}}``. Reads arrays only — no model config, no code."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            if "layer_names" not in group.attrs:
                raise WeightImportError(f"{path}: not a keras weights file (no layer_names)")
            out: dict[str, dict[str, np.ndarray]] = {}
            for lname in (_text(n) for n in group.attrs["layer_names"]):
                layer = group[lname]
                names = [_text(w) for w in layer.attrs.get("weight_names", [])]
                if names:
                    out[lname] = {_short(w): np.asarray(layer[w]) for w in names}
            return out
    except OSError as exc:
        raise WeightImportError(f"{path}: cannot read as HDF5: {exc}") from None


def apply_weights(model: Any, weights: Mapping[str, Mapping[str, np.ndarray]], *, skip_logits: bool = False) -> list[str]:
    """Assign the original's weights to ``model`` through :func:`segd_layer_name`; return the
    layers loaded. Every original layer must land on a layer of ours with the same weight names
    and shapes, and every layer of ours that has weights must get them (the logits excepted
    when ``skip_logits``): all is checked before anything is assigned."""
    layers = {layer.name: layer for layer in model.layers}
    plan: list[tuple[Any, list[np.ndarray]]] = []
    problems: list[str] = []
    for original, arrays in weights.items():
        try:
            name = segd_layer_name(original)
        except WeightImportError as exc:
            problems.append(str(exc))
            continue
        if skip_logits and name == LOGITS:
            continue
        layer = layers.get(name)
        if layer is None:
            problems.append(f"{original} -> {name}: no such layer in {model.name}")
            continue
        order = [_short(w.name) for w in layer.weights]
        if sorted(order) != sorted(arrays):
            problems.append(f"{original} -> {name}: weights {sorted(arrays)} vs ours {sorted(order)}")
            continue
        values = [np.asarray(arrays[k]) for k in order]
        shapes = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != shapes:
            problems.append(f"{original} -> {name}: shapes {[v.shape for v in values]} vs ours {shapes}")
            continue
        plan.append((layer, values))
    covered = {layer.name for layer, _ in plan}
    missed = [
        layer.name for layer in model.layers
        if layer.weights and layer.name not in covered and not (skip_logits and layer.name == LOGITS)
    ]  # fmt: skip
    if missed:
        problems.append(f"layers of ours without weights in the file: {missed}")
    if problems:
        raise WeightImportError("original weights do not fit:\n  " + "\n  ".join(problems))
    for layer, values in plan:
        layer.set_weights(values)
    return sorted(covered)


def file_spec(arch: str, alpha: float) -> Any:
    """The segd FileSpec of the original's .h5 for (``v3``/``v3plus``, alpha): md5-only,
    fetched from Google Drive (or a mirror), sha256 pinned after the first verified fetch."""
    from segd.variants import FileSpec

    try:
        f = H5_FILES[(arch, float(alpha))]
    except KeyError:
        raise ValueError(f"the original published no {arch} weights for alpha={alpha!r}") from None
    return FileSpec(name=f.name, sha256="", md5=f.md5, gdrive_id=f.gdrive_id)


def default_dir() -> Path:
    """Where fetched .h5 files live: ``<coral_deeplab cache>/coral-deeplab``."""
    from coral_deeplab.weights import cache_dir

    return cache_dir() / "coral-deeplab"


def fetch(
    arch: str,
    alpha: float,
    *,
    directory: Path | None = None,
    mirror: str | None = None,
    spec: Any = None,
) -> Path:
    """Path of the verified .h5 for (arch, alpha): from ``directory``, else the mirror (by file
    name), else Google Drive — md5-checked, then sha256-pinned. Raises WeightsUnavailable
    saying why (offline, quota, dead link, wrong file)."""
    from segd.variants import resolve_file

    spec = spec if spec is not None else file_spec(arch, alpha)
    target = directory if directory is not None else default_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
        return resolve_file(spec, target, mirror=mirror)  # Drive's address: SEGD_GDRIVE_URL, else Google's
    except (SegdError, OSError) as exc:
        raise WeightsUnavailable(getattr(exc, "detail", None) or str(exc)) from exc


def choose_source(source: str, arch: str, alpha: float, *, mirror: str | None = None) -> Path | None:
    """Resolve a ``weights='pascal_voc'`` source choice: the original's .h5 path, or None for
    Google's .tflite import. ``auto`` warns (UserWarning) when it has to fall back."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "google-tflite":
        return None
    try:
        return fetch(arch, alpha, mirror=mirror)
    except WeightsUnavailable as exc:
        if source == "coral-deeplab":
            raise
        what = (
            "only the encoder is pretrained (Google published no mobile v3+ weights) and the "
            "decoder is DeepLab's, not the original's"
            if arch == "v3plus"
            else "same architecture, Google's training"
        )
        warnings.warn(
            f"the original coral-deeplab {arch} weights could not be fetched ({exc}); importing "
            f"Google's PASCAL VOC weights from its Coral .tflite instead: {what}. Put "
            f"{H5_FILES[(arch, float(alpha))].name} in {default_dir()} or a mirror to use them.",
            UserWarning,
            stacklevel=3,
        )
        return None
