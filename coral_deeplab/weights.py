"""Import Google's PASCAL VOC DeepLab weights from the Coral ``.tflite`` files.

Google published the mobile DeepLab v3 PASCAL VOC models (MobileNetV2 depth multiplier 1.0 and
0.5) for Coral only as quantized ``.tflite`` files. Their weights are per-tensor uint8 with
BatchNorm folded in, and tensor names keep the original checkpoint scopes
(``MobilenetV2/expanded_conv_14/depthwise/...``, ``aspp0``, ``logits/semantic``), so they map
by name onto :mod:`coral_deeplab.applications` layers, whose names are those scopes with ``/``
turned into ``_``. Each conv kernel is dequantized and transposed to keras layout; its folded
bias goes into the following BatchNormalization as ``beta`` with the BN made an identity
(gamma 1, mean 0, variance ``1 - epsilon``), so the model keeps its BN layers for fine-tuning.

This module needs no TensorFlow until weights are assigned to a model. The extracted arrays are
cached as ``.npz`` under ``$CORAL_DEEPLAB_CACHE`` (default ``~/.cache/coral_deeplab``), keyed
on the source file's sha256 and on the code that extracts them (:func:`code_version`), so a
changed extractor never reuses an old entry; an unreadable entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segd.errors import SegdError
from segd.fsutil import atomic_write

__all__ = [
    "PASCAL_VARIANTS",
    "WeightImportError",
    "apply_weights",
    "cache_dir",
    "cache_path",
    "code_version",
    "extract_weights",
    "keras_layer_name",
    "load_pascal_voc",
    "pascal_voc_weights",
    "source_model",
]

# alpha -> segd variant name of Google's Coral PASCAL VOC model.
PASCAL_VARIANTS: dict[float, str] = {
    1.0: "deeplabv3_mnv2_pascal",
    0.5: "deeplabv3_mnv2_dm05_pascal",
}
LOGITS = "logits_semantic"
#: Modules whose code decides the extracted arrays (part of the cache file name).
_CODE_MODULES = ("coral_deeplab.weights", "segd.tflite.model")
_CONV_SUFFIXES = ("/Conv2D_Fold", "/depthwise_Fold", "/Conv2D", "/depthwise")


class WeightImportError(SegdError, ValueError):
    """Google's file and the keras model disagree (missing layer, shape mismatch...)."""

    code = "weight_import_failed"


def keras_layer_name(scope: str) -> str:
    """``MobilenetV2/expanded_conv_3/expand`` -> ``expanded_conv_3_expand``."""
    if scope.startswith("MobilenetV2/"):
        scope = scope[len("MobilenetV2/") :]
    return scope.replace("/", "_")


def _scope(weight_name: str) -> str:
    first = weight_name.split(";")[0]
    for suffix in _CONV_SUFFIXES:
        if first.endswith(suffix):
            return first[: -len(suffix)]
    raise WeightImportError(f"cannot tell the layer scope of weight tensor {first!r}")


def extract_weights(tflite_bytes: bytes) -> dict[str, np.ndarray]:
    """Float kernels and biases of every conv in a Google DeepLab ``.tflite``, keras layout.

    Returns ``{"<layer>/kernel": (kh, kw, cin, cout) or (kh, kw, c, 1), "<layer>/bias": (cout,)}``
    keyed by keras layer name. Raises WeightImportError on duplicates or unreadable tensors.
    """
    from segd.tflite.model import dequantize, list_ops, read_model, tensor_data

    try:
        model = read_model(tflite_bytes)
    except ValueError as exc:
        raise WeightImportError(str(exc)) from exc
    if len(model.subgraphs) != 1:
        raise WeightImportError(f"expected one subgraph, found {len(model.subgraphs)}")
    out: dict[str, np.ndarray] = {}
    for op in list_ops(model):
        if op.name not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        w_t = op.inputs[1]
        name = keras_layer_name(_scope(w_t.name))
        if f"{name}/kernel" in out:
            raise WeightImportError(f"layer {name!r} appears twice in the source model")
        try:
            # TFLite keeps conv kernels as (cout, kh, kw, cin) and depthwise as (1, kh, kw, c);
            # keras wants (kh, kw, cin, cout) and (kh, kw, c, 1): the same transpose for both.
            kernel = dequantize(tensor_data(model, w_t), w_t.quantization).transpose(1, 2, 3, 0)
            if len(op.inputs) < 3:
                raise ValueError("no bias tensor (Google's convs all carry a folded bias)")
            b_t = op.inputs[2]
            bias = dequantize(tensor_data(model, b_t), b_t.quantization)
        except ValueError as exc:
            raise WeightImportError(f"layer {name!r}: {exc}") from exc
        out[f"{name}/kernel"] = np.ascontiguousarray(kernel)
        out[f"{name}/bias"] = np.ascontiguousarray(bias)
    if not out:
        raise WeightImportError("no convolution weights found in the source model")
    return out


def cache_dir() -> Path:
    """``$CORAL_DEEPLAB_CACHE`` or ``~/.cache/coral_deeplab``."""
    env = os.environ.get("CORAL_DEEPLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "coral_deeplab"


def source_model(
    alpha: float, *, models_dir: Path | None = None, mirror: str | None = None
) -> tuple[str, bytes]:
    """(variant name, verified bytes) of Google's PASCAL model for ``alpha``, via segd.variants.

    The file is found in the models dir, else copied from the mirror (``SEGD_MODEL_MIRROR``),
    else downloaded; its sha256 is checked against the manifest in every case.
    """
    from segd import variants

    try:
        name = PASCAL_VARIANTS[float(alpha)]
    except KeyError:
        raise ValueError(
            f"no pretrained PASCAL VOC weights for alpha={alpha!r}; "
            f"available: {sorted(PASCAL_VARIANTS)}"
        ) from None
    spec = variants.load_manifest(models_dir=models_dir).get(name).cpu
    assert spec is not None, f"{name} has a CPU file in the built-in manifest"
    path = variants.resolve_file(spec, models_dir, mirror=mirror)
    return name, variants.read_verified(path, spec)


def code_version() -> str:
    """Short hash of the extraction code (:data:`_CODE_MODULES`, read without importing)."""
    h = hashlib.sha256()
    for name in _CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot locate module {name}")
        h.update(name.encode())
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:12]


def cache_path(directory: Path, variant: str, source: bytes) -> Path:
    """Cache entry of ``variant``'s weights: ``<variant>-<source sha256>-<code version>.npz``."""
    digest = hashlib.sha256(source).hexdigest()
    return directory / f"{variant}-{digest[:12]}-{code_version()}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache entry, or None when it is missing or unreadable in any way
    (truncated zip, bad CRC, not an npz...): a cache is only ever a shortcut."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            weights = {k: npz[k] for k in npz.files}
    except Exception:  # zipfile, zlib, OSError, ValueError, EOFError...
        return None
    return weights or None


def pascal_voc_weights(
    alpha: float,
    *,
    models_dir: Path | None = None,
    mirror: str | None = None,
    cache: Path | None = None,
) -> dict[str, np.ndarray]:
    """Imported PASCAL VOC weights for ``alpha``, from the cache or extracted and cached."""
    name, data = source_model(alpha, models_dir=models_dir, mirror=mirror)
    path = cache_path(cache if cache is not None else cache_dir(), name, data)
    cached = _read_cache(path)
    if cached is not None:
        return cached
    weights = extract_weights(data)
    _write_cache(path, weights)
    return weights


def _write_cache(path: Path, weights: Mapping[str, np.ndarray]) -> None:
    """Write the entry atomically (:func:`segd.fsutil.atomic_write`): readers never see a
    partial file. A cache that cannot be written only costs re-extraction next time."""
    buf = io.BytesIO()
    save: Any = np.savez  # numpy's stub types **kwds as the allow_pickle flag
    save(buf, **weights)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError:
        pass


def apply_weights(
    model: Any,
    weights: Mapping[str, np.ndarray],
    *,
    skip_logits: bool = False,
    require_all: bool = True,
) -> list[str]:
    """Assign imported weights to ``model`` by layer name; return the names of loaded layers.

    Every source layer must exist in the model with the same shapes (the logits layer is
    skipped when ``skip_logits``). With ``require_all``, every conv of the model except the
    logits and the v3+ decoder must receive weights. Everything is checked before anything is
    assigned: on error the model is left untouched, never half "pretrained".
    """
    import tf_keras as keras

    layers = {layer.name: layer for layer in model.layers}
    names = sorted({k.rsplit("/", 1)[0] for k in weights})
    plan: list[tuple[Any, list[np.ndarray]]] = []
    loaded: list[str] = []
    problems: list[str] = []
    for name in names:
        if skip_logits and name == LOGITS:
            continue
        layer = layers.get(name)
        kernel, bias = weights[f"{name}/kernel"], weights[f"{name}/bias"]
        if layer is None:
            problems.append(f"{name}: no such layer in {model.name}")
            continue
        current = layer.get_weights()
        if not current or current[0].shape != kernel.shape:
            got = current[0].shape if current else None
            problems.append(f"{name}: kernel shape {kernel.shape} vs model {got}")
            continue
        if layer.use_bias:
            if len(current) != 2 or current[1].shape != bias.shape:
                problems.append(f"{name}: bias shape {bias.shape} vs model")
                continue
            plan.append((layer, [kernel, bias]))
        else:
            bn = layers.get(f"{name}_BN")
            if not isinstance(bn, keras.layers.BatchNormalization):
                problems.append(f"{name}: folded bias but no {name}_BN layer to carry it")
                continue
            if tuple(bn.gamma.shape) != bias.shape:
                problems.append(f"{name}_BN: {tuple(bn.gamma.shape)} vs bias {bias.shape}")
                continue
            ones = np.ones_like(bias)
            plan.append((layer, [kernel]))
            plan.append((bn, [ones, bias, np.zeros_like(bias), ones - bn.epsilon]))
        loaded.append(name)
    if require_all:
        conv_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
        expected = {
            layer.name
            for layer in model.layers
            if isinstance(layer, conv_types) and not _decoder_only(layer.name)
        }
        missing = sorted(expected - set(loaded) - {p.split(":")[0] for p in problems})
        if missing:
            problems.append(f"model layers without source weights: {missing}")
    if problems:
        raise WeightImportError("weight import failed:\n  " + "\n  ".join(problems))
    for layer, values in plan:
        layer.set_weights(values)
    return loaded


def _decoder_only(name: str) -> bool:
    return name.startswith(("feature_projection", "decoder_")) or name == LOGITS


def load_pascal_voc(
    model: Any,
    *,
    alpha: float,
    skip_logits: bool = False,
    models_dir: Path | None = None,
    mirror: str | None = None,
    cache: Path | None = None,
) -> list[str]:
    """Load Google's PASCAL VOC weights into a coral_deeplab model (see :func:`apply_weights`)."""
    weights = pascal_voc_weights(alpha, models_dir=models_dir, mirror=mirror, cache=cache)
    return apply_weights(model, weights, skip_logits=skip_logits)
