"""Input/output tensors read from a model file, for manifest entries that do not state them.

The original coral-deeplab's compiled files were never inspected where their manifest entries
were written (Google Drive was unreachable), so those entries give no shapes: segd reads them
from the file's flatbuffer (no interpreter needed, so it works for an Edge-TPU-only file on a
machine without a TPU) and refuses a file that does not look like what the entry describes:

* one ``[1, N, N, 3]`` input with ``N = 16k + 1`` (DeepLab's geometry, :mod:`coral_deeplab.geometry`);
* one ``[1, n, n, C]`` logits output on the align-corners grid of that input, at the stride the
  entry names (16 for v3, 4 for v3+) or else 16 or 4;
* ``C`` equal to the number of labels.
"""

from __future__ import annotations

from dataclasses import replace

from segd.errors import ModelError
from segd.manifest import Variant, image_model_tensors

__all__ = ["ALLOWED_STRIDES", "read_tensors"]

ALLOWED_STRIDES = (16, 4)


def read_tensors(variant: Variant, model: bytes, where: str) -> Variant:
    """``variant`` with input/output shape, dtype, stride and corners read from ``model``
    (already verified and tail-stripped as the entry says). Raises ModelError naming the file
    and what is wrong with it."""
    from segd.geometry import check_side, output_geometry

    inp, out = image_model_tensors(model, where)
    shape_in, shape_out = tuple(int(x) for x in inp.shape), tuple(int(x) for x in out.shape)
    if len(shape_in) != 4 or shape_in[0] != 1 or shape_in[3] != 3 or shape_in[1] != shape_in[2]:
        raise ModelError(f"{where}: input {list(shape_in)} is not a square [1, N, N, 3] image")
    try:
        check_side(shape_in[1], "input side")
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    if len(shape_out) != 4 or shape_out[0] != 1:
        raise ModelError(f"{where}: output {list(shape_out)} is not [1, h, w, classes] logits")
    if shape_out[3] != variant.n_classes:
        raise ModelError(
            f"{where}: output has {shape_out[3]} classes, the labels {variant.labels.names[:3]}... "
            f"name {variant.n_classes}"
        )
    try:
        stride, corners = output_geometry(shape_in[1:3], shape_out[1:3])
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    wanted = (variant.output.stride,) if variant.output.stride else ALLOWED_STRIDES
    if stride not in wanted:
        raise ModelError(f"{where}: logits at stride {stride}, the manifest expects {' or '.join(map(str, wanted))}")
    if inp.dtype is None or out.dtype is None:
        raise ModelError(f"{where}: unsupported tensor types {inp.type_name} / {out.type_name}")
    return replace(
        variant,
        input=replace(variant.input, shape=shape_in, dtype=inp.dtype.name),
        output=replace(variant.output, shape=shape_out, dtype=out.dtype.name, stride=stride, align_corners=corners),
    )
