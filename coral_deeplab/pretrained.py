"""Google's PASCAL VOC DeepLab weights -> coral_deeplab int8 export (cached on disk) -> published
variant: :func:`pascal_export` and :func:`build` (they need TensorFlow; a cache hit does not
import it). The cache key covers everything an export depends on (:func:`export_cache_key`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coral_deeplab.publish import NAME_PATTERN, PublishError, PublishResult, publish
from segd import geometry
from segd.fsutil import atomic_write

__all__ = [
    "PascalExport",
    "build",
    "default_build_name",
    "export_cache_key",
    "pascal_export",
    "require_tensorflow",
]

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
    weights_source: str = "google-tflite",
) -> PascalExport:
    """int8 export of CoralDeepLabV3/V3Plus with ``weights='pascal_voc'``, cached on disk.

    ``weights_source``: ``'google-tflite'`` (Google's Coral model, imported; v3+ gets its encoder
    only) or ``'coral-deeplab'`` (the original coral-deeplab's trained .h5, the whole network —
    a CPU file of the same trained network as its Edge TPU compiled file).

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
    if weights_source not in ("google-tflite", "coral-deeplab"):
        raise ValueError(f"weights_source must be google-tflite or coral-deeplab, got {weights_source!r}")
    h5: Path | None = None
    if weights_source == "coral-deeplab":
        from coral_deeplab import original_weights

        h5 = original_weights.fetch(variant, alpha, mirror=mirror)
        source, data = f"coral-deeplab {h5.name}", h5.read_bytes()
    else:
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
    if h5 is not None:
        model = builder((input_size, input_size, 3), alpha=float(alpha), n_classes=21, weights=h5, source="coral-deeplab")
    else:
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
    weights_source: str = "google-tflite",
) -> tuple[PascalExport, PublishResult]:
    """Pretrained import -> int8 export -> check -> compile when possible -> publish.

    ``variant='v3plus'`` publishes a model whose decoder and logits are untrained (Google
    published no v3+ mobile PASCAL model; only the encoder is imported): a starting point for
    training, whose masks are meaningless until it is trained. The description says so.
    With ``weights_source='coral-deeplab'`` the original's trained weights are used instead
    (v3 and v3+, whole network; see :func:`pascal_export`).
    """
    from segd.variants import load_manifest

    _check_args(variant, alpha, input_size)
    name = name or default_build_name(variant, alpha, input_size) + ("_original" if weights_source == "coral-deeplab" else "")
    if not NAME_PATTERN.fullmatch(name):
        raise PublishError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
    built = pascal_export(
        variant=variant, alpha=alpha, input_size=input_size, calibration=calibration,
        num_calibration=num_calibration, models_dir=models_dir, mirror=mirror, cache=cache,
        weights_source=weights_source,
    )  # fmt: skip
    from coral_deeplab.weights import PASCAL_VARIANTS

    # PASCAL VOC labels: from Google's variant (also for the original's weights, same 21 classes)
    source = load_manifest(models_dir=models_dir).get(PASCAL_VARIANTS[float(alpha)])
    arch = "DeepLab v3" if variant == "v3" else "DeepLab v3+"
    description = (
        f"coral_deeplab {arch}, MobileNetV2 depth multiplier {float(alpha)}, "
        f"{input_size}x{input_size}, PASCAL VOC weights imported from {built.source}, "
        f"int8 export calibrated on {built.n_calibration} images"
    )
    if variant == "v3plus" and weights_source != "coral-deeplab":
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


