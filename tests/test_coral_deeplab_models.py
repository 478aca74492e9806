"""coral_deeplab.applications / layers: shapes, argument checking, and the custom layers'
numerics against the stock TensorFlow ops they replace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        ((512, 512, 3), 0.5, (32, 32)),
        ((224, 224, 3), 1.0, (14, 14)),
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
        ((512, 384, 3), 1.0, (128, 96)),
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


def test_stride_two_convs_use_tf_same_padding():
    # 513 -> 257 -> 129 -> 65 -> 33 is TF "SAME" (ceil); keras' MobileNetV2 ZeroPadding + valid
    # would give the same sizes but shift the sampling grid by a pixel.
    model = applications.CoralDeepLabV3((513, 513, 3))
    assert model.get_layer("Conv").padding == "same"
    assert model.get_layer("Conv").output_shape[1:3] == (257, 257)
    assert model.get_layer("expanded_conv_1_depthwise").output_shape[1:3] == (129, 129)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (3, 513, 513)}, "channels-first"),
        ({"input_shape": (513, 513, 4)}, "3 \\(RGB\\) channels"),
        ({"input_shape": (513, 513)}, "fully defined"),
        ({"input_shape": (None, 513, 3)}, "fully defined"),
        ({"input_shape": (16, 16, 3)}, "minimum"),
        ({"input_shape": (500, 500, 3)}, "16k or 16k\\+1"),
        ({"input_shape": (513, 515, 3)}, "16k or 16k\\+1"),
        ({"input_shape": (512, 513, 3)}, "mixes"),
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
