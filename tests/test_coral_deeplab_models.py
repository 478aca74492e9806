"""coral_deeplab.applications / layers: shapes, argument checking, and the custom layers'
numerics against the stock TensorFlow ops they replace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

from coral_deeplab import applications  # noqa: E402
from coral_deeplab.layers import BroadcastTo2D, DilatedDepthwiseConv2D, ResizeBilinear  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("shape", "alpha", "logits_hw"),
    [
        ((513, 513, 3), 1.0, (33, 33)),
        ((513, 513, 3), 0.5, (33, 33)),
        ((257, 321, 3), 1.0, (17, 21)),
        ((33, 65, 3), 0.5, (3, 5)),
    ],
)
def test_v3_outputs_logits_at_output_stride_16(shape, alpha, logits_hw):
    model = applications.CoralDeepLabV3(shape, alpha=alpha)
    assert model.output_shape == (None, *logits_hw, 21)
    assert model.input_shape == (None, *shape)


@pytest.mark.parametrize(
    ("shape", "alpha", "logits_hw"),
    [
        ((513, 513, 3), 1.0, (129, 129)),
        ((257, 257, 3), 0.5, (65, 65)),
        ((385, 129, 3), 1.0, (97, 33)),
    ],
)
def test_v3plus_outputs_logits_at_output_stride_4(shape, alpha, logits_hw):
    model = applications.CoralDeepLabV3Plus(shape, alpha=alpha, n_classes=7)
    assert model.output_shape == (None, *logits_hw, 7)


def test_n_classes_sets_logits_channels():
    model = applications.CoralDeepLabV3((257, 257, 3), n_classes=2)
    assert model.output_shape[-1] == 2
    assert model.get_layer("logits_semantic").bias.shape == (2,)


@pytest.mark.parametrize(
    ("alpha", "first", "block0", "last", "expand1"),
    [(1.0, 32, 16, 320, 96), (0.5, 16, 8, 160, 48)],
)
def test_channel_counts_follow_deeplab_depth_multiplier(alpha, first, block0, last, expand1):
    # The numbers are Google's (read off deeplabv3_mnv2_*pascal_quant.tflite): at 0.5 DeepLab
    # halves channels without rounding to multiples of 8 (block 1 projects to 12, not 16).
    model = applications.CoralDeepLabV3((257, 257, 3), alpha=alpha)
    assert model.get_layer("Conv").filters == first
    assert model.get_layer("expanded_conv_project").filters == block0
    assert model.get_layer("expanded_conv_1_expand").filters == expand1
    assert model.get_layer("expanded_conv_1_project").filters == int(24 * alpha)
    assert model.get_layer("expanded_conv_16_project").filters == last
    assert model.get_layer("aspp0").filters == 256  # ASPP width does not scale with alpha


def test_output_stride_16_dilates_the_last_three_blocks():
    model = applications.CoralDeepLabV3((513, 513, 3))
    for block in (14, 15, 16):
        layer = model.get_layer(f"expanded_conv_{block}_depthwise")
        assert isinstance(layer, DilatedDepthwiseConv2D)
        assert tuple(layer.dilation_rate) == (2, 2)
    block13 = model.get_layer("expanded_conv_13_depthwise")
    assert tuple(block13.strides) == (1, 1) and tuple(block13.dilation_rate) == (1, 1)
    assert model.get_layer("expanded_conv_13_depthwise").output_shape[1:3] == (33, 33)


def _centres(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """Input row/column each output of a spatial conv is centred on: a copy of the layer (same
    config: kernel, strides, padding, dilation) whose kernel is 1 at its centre tap only, fed the
    flat pixel index of its input, outputs the index of the pixel its kernel centre sat on."""
    _, h, w, c = layer.input_shape
    copy = type(layer).from_config(layer.get_config())
    copy.build((1, h, w, c))
    values = []
    for weight in copy.get_weights():
        v = np.zeros_like(weight)
        if v.ndim == 4:
            kh, kw = v.shape[:2]
            if isinstance(copy, keras.layers.DepthwiseConv2D):
                v[kh // 2, kw // 2, :, 0] = 1
            else:
                v[kh // 2, kw // 2, 0, 0] = 1  # output channel 0 copies input channel 0
        values.append(v)
    copy.set_weights(values)
    index = np.arange(h * w, dtype=np.float32).reshape(1, h, w, 1)
    out = copy(np.repeat(index, c, axis=3)).numpy()[0, :, :, 0].astype(np.int64)
    rows, cols = out // w, out % w
    assert (rows == rows[:, :1]).all() and (cols == cols[:1, :]).all()
    return rows[:, 0], cols[0, :]


@pytest.mark.parametrize("builder", ["CoralDeepLabV3", "CoralDeepLabV3Plus"])
def test_every_spatial_conv_is_centred_so_logit_i_sits_on_pixel_stride_times_i(builder):
    # Follow the pixel each feature map position is centred on through every 3x3 conv of the
    # real model: TF "SAME" on 16k+1 sides pads 1 pixel on both sides, so a stride-2 output j
    # sits on input 2 j, stride-1 convs (dilated too) keep positions, and v3 logit i sits on
    # pixel 16 i (v3+: 4 i) — the align-corners geometry the loss, decoder and segd assume.
    # (keras' ZeroPadding + "valid", or an even side, would put it on 16 i + 15.)
    model = getattr(applications, builder)((129, 97, 3), alpha=0.5, n_classes=3)
    grid = {("h", 129): np.arange(129), ("w", 97): np.arange(97)}
    seen_strides = []
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            continue
        if tuple(layer.kernel_size) == (1, 1):
            continue  # a 1x1 conv cannot move anything
        _, h, w, _ = layer.input_shape
        _, oh, ow, _ = layer.output_shape
        rows, cols = _centres(layer)
        for axis, size, out_size, sampled in (("h", h, oh, rows), ("w", w, ow, cols)):
            positions = grid[(axis, size)][sampled]
            if (axis, out_size) in grid:
                np.testing.assert_array_equal(positions, grid[(axis, out_size)], err_msg=layer.name)
            grid[(axis, out_size)] = positions
        seen_strides.append(layer.strides[0])
    assert seen_strides.count(2) == 4  # Conv and three depthwise convs: output stride 16
    stride = 16 if builder == "CoralDeepLabV3" else 4
    _, lh, lw, _ = model.output_shape
    assert (lh, lw) == ((129 - 1) // stride + 1, (97 - 1) // stride + 1)
    np.testing.assert_array_equal(grid[("h", lh)], stride * np.arange(lh))
    np.testing.assert_array_equal(grid[("w", lw)], stride * np.arange(lw))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (3, 513, 513)}, "channels-first"),
        ({"input_shape": (513, 513, 4)}, "3 \\(RGB\\) channels"),
        ({"input_shape": (513, 513)}, "fully defined"),
        ({"input_shape": (None, 513, 3)}, "fully defined"),
        ({"input_shape": (16, 16, 3)}, "minimum"),
        ({"input_shape": (17, 17, 3)}, "minimum"),
        ({"input_shape": (501, 501, 3)}, "not 16k\\+1 \\(use 497 or 513"),
        ({"input_shape": (513, 515, 3)}, "width 515 is not 16k\\+1"),
        ({"input_shape": (512, 512, 3)}, "16 i \\+ 15"),
        ({"input_shape": (513, 256, 3)}, "width 256 is not 16k\\+1.*16 i \\+ 15"),
        ({"alpha": 0.75}, "alpha"),
        ({"alpha": 1.4}, "alpha"),
        ({"n_classes": 1}, "n_classes"),
        ({"n_classes": 0}, "n_classes"),
        ({"n_classes": 2.5}, "n_classes"),
        ({"weights": "imagenet"}, "weights"),
    ],
)
@pytest.mark.parametrize("builder", ["CoralDeepLabV3", "CoralDeepLabV3Plus"])
def test_invalid_arguments_raise_value_error(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(applications, builder)(**kwargs)


def test_channels_first_data_format_is_refused():
    previous = keras.backend.image_data_format()
    keras.backend.set_image_data_format("channels_first")
    try:
        with pytest.raises(ValueError, match="channels_first"):
            applications.CoralDeepLabV3()
    finally:
        keras.backend.set_image_data_format(previous)


def test_dilated_depthwise_layer_matches_keras_dilated_depthwise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 17, 19, 8)).astype(np.float32)
    ours = DilatedDepthwiseConv2D(3, padding="same", dilation_rate=2, use_bias=True)
    stock = keras.layers.DepthwiseConv2D(3, padding="same", dilation_rate=2, use_bias=True)
    ours.build(x.shape)
    stock.build(x.shape)
    kernel = rng.normal(size=(3, 3, 8, 1)).astype(np.float32)
    bias = rng.normal(size=(8,)).astype(np.float32)
    ours.set_weights([kernel, bias])
    stock.set_weights([kernel, bias])
    np.testing.assert_allclose(ours(x).numpy(), stock(x).numpy(), rtol=1e-5, atol=1e-5)


def test_dilated_depthwise_layer_refuses_strides():
    with pytest.raises(ValueError, match="strides"):
        DilatedDepthwiseConv2D(3, strides=2, dilation_rate=2)


def test_broadcast_equals_align_corners_resize_of_one_pixel():
    # DeepLab's image pooling resizes a 1x1 map bilinearly (align_corners); that is a copy.
    x = np.random.default_rng(1).normal(size=(1, 1, 1, 5)).astype(np.float32)
    ours = BroadcastTo2D((33, 21))(x).numpy()
    ref = tf.compat.v1.image.resize_bilinear(x, (33, 21), align_corners=True).numpy()
    assert ours.shape == (1, 33, 21, 5)
    np.testing.assert_array_equal(ours, ref)


def test_resize_layer_is_tf1_align_corners_bilinear():
    x = np.random.default_rng(2).normal(size=(1, 9, 9, 3)).astype(np.float32)
    out = ResizeBilinear((33, 33), align_corners=True)(x).numpy()
    ref = tf.compat.v1.image.resize_bilinear(x, (33, 33), align_corners=True).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # align_corners: output pixel 4i samples input pixel i exactly
    np.testing.assert_allclose(out[:, ::4, ::4], x, rtol=1e-6, atol=1e-6)


def test_model_config_round_trips_with_custom_layers():
    model = applications.CoralDeepLabV3Plus((65, 65, 3), alpha=0.5, n_classes=3)
    clone = keras.models.model_from_json(model.to_json())
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(3).uniform(-1, 1, size=(1, 65, 65, 3)).astype(np.float32)
    np.testing.assert_allclose(clone.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_weights_path_loads_saved_weights(tmp_path):
    model = applications.CoralDeepLabV3((129, 129, 3), alpha=0.5, n_classes=4)
    # make the weights distinguishable from a fresh initialisation
    model.set_weights([w + 0.01 * (i + 1) for i, w in enumerate(model.get_weights())])
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    loaded = applications.CoralDeepLabV3((129, 129, 3), alpha=0.5, n_classes=4, weights=path)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_importing_coral_deeplab_does_not_import_tensorflow():
    code = (
        "import sys, coral_deeplab, coral_deeplab.weights, coral_deeplab.export; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
        "assert 'tf_keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_package_exposes_builders_and_export_lazily():
    import coral_deeplab
    from coral_deeplab import export

    assert coral_deeplab.CoralDeepLabV3 is applications.CoralDeepLabV3
    assert coral_deeplab.CoralDeepLabV3Plus is applications.CoralDeepLabV3Plus
    assert coral_deeplab.to_tflite is export.to_tflite
    with pytest.raises(AttributeError):
        _ = coral_deeplab.no_such_thing
