"""The model zoo, one import for the three things people do with coral_deeplab models:
publish an exported ``.tflite`` (:mod:`coral_deeplab.publish`), build the pretrained PASCAL VOC
exports (:mod:`coral_deeplab.pretrained`, TensorFlow), and open a published or precompiled
model ready to segment (:func:`from_precompiled`, which never imports TensorFlow).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from coral_deeplab.pretrained import (
    _EXPORT_CODE,
    PascalExport,
    build,
    default_build_name,
    export_cache_key,
    pascal_export,
    require_tensorflow,
)
from coral_deeplab.publish import (
    NAME_PATTERN,
    PublishError,
    PublishResult,
    describe_report,
    output_geometry,
    publish,
)

if TYPE_CHECKING:
    from segd.engine import Segmenter

__all__ = [
    "NAME_PATTERN",
    "_EXPORT_CODE",
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
]


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
