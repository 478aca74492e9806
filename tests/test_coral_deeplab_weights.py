"""Importing Google's PASCAL VOC weights from the Coral .tflite files reproduces Google's masks.

The float keras model with imported weights is compared with the Google model's own in-graph
ArgMax output (uint8 model, run with LiteRT) on real images: both see the same 513x513 RGB
image, our logits are upsampled with TF1 align-corners bilinear like Google's graph does.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")
cv2 = pytest.importorskip("cv2")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from coral_deeplab import applications, weights  # noqa: E402
from segd.errors import ChecksumMismatch  # noqa: E402
from segd.tflite import model as segd_tflite_model  # noqa: E402

GOOGLE = {1.0: "deeplabv3_mnv2_pascal_quant.tflite", 0.5: "deeplabv3_mnv2_dm05_pascal_quant.tflite"}
IMAGES = ("bird_segmentation.bmp", "cat.bmp")
SIZE = 513


def rgb_513(test_data: Path, name: str) -> np.ndarray:
    """The image as RGB, stretched to 513x513 (cat.bmp is 512x341) — same input for both."""
    image = cv2.imread(str(test_data / name), cv2.IMREAD_COLOR)[:, :, ::-1]
    if image.shape[:2] != (SIZE, SIZE):
        image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image)


def google_argmax(model_path: Path, image: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_path=str(model_path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]


def upsampled_argmax(logits: np.ndarray) -> np.ndarray:
    up = tf.compat.v1.image.resize_bilinear(logits[None], (SIZE, SIZE), align_corners=True)
    return np.argmax(up[0].numpy(), axis=-1)


@pytest.fixture(scope="session")
def weight_env(tmp_path_factory, test_data):
    """models dir and cache in tmp, the test data dir as the mirror (never the repo)."""
    root = tmp_path_factory.mktemp("cdl_weights")
    return {"models_dir": root / "models", "mirror": str(test_data), "cache": root / "cache"}


@pytest.fixture(scope="session")
def imported(weight_env):
    return {alpha: weights.pascal_voc_weights(alpha, **weight_env) for alpha in (1.0, 0.5)}


@pytest.fixture(scope="session")
def float_models(imported):
    models = {}
    for alpha, w in imported.items():
        model = applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=alpha)
        weights.apply_weights(model, w)
        models[alpha] = model
    return models


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_every_google_conv_maps_onto_a_model_layer(imported, alpha):
    model = applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=alpha)
    convs = {
        layer.name
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
    }
    names = {k.rsplit("/", 1)[0] for k in imported[alpha]}
    assert names == convs
    # Conv, 16 expand, 17 depthwise, 17 project; aspp0, image_pooling, concat_projection, logits
    assert len(names) == 55
    loaded = weights.apply_weights(model, imported[alpha])
    assert sorted(loaded) == sorted(names)


def test_folded_bias_lands_in_an_identity_batchnorm(float_models, imported):
    model = float_models[1.0]
    bias = imported[1.0]["aspp0/bias"]
    bn = model.get_layer("aspp0_BN")
    gamma, beta, mean, var = bn.get_weights()
    np.testing.assert_array_equal(beta, bias)
    assert np.all(gamma == 1.0) and np.all(mean == 0.0)
    np.testing.assert_allclose(var, 1.0 - bn.epsilon)
    x = np.random.default_rng(0).normal(size=(1, 4, 4, 256)).astype(np.float32)
    out = model.get_layer("aspp0_BN")(x, training=False).numpy()
    np.testing.assert_allclose(out, x + bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("image_name", IMAGES)
def test_float_model_with_imported_weights_agrees_with_google(
    float_models, test_data, alpha, image_name
):
    image = rgb_513(test_data, image_name)
    x = (image.astype(np.float32) - 128.0) / 128.0
    logits = float_models[alpha].predict(x[None], verbose=0)[0]
    ours = upsampled_argmax(logits)
    google = google_argmax(test_data / GOOGLE[alpha], image)
    agreement = float(np.mean(ours == google))
    print(f"float DM{alpha} {image_name}: {agreement:.4f} of pixels agree with Google")
    assert agreement >= 0.98
    # not a trivial mask: the image's object class is found
    assert len(np.unique(ours)) >= 2


def test_pascal_voc_keyword_with_other_class_count_keeps_fresh_logits(
    monkeypatch, weight_env, imported
):
    monkeypatch.setenv("SEGD_MODELS_DIR", str(weight_env["models_dir"]))
    monkeypatch.setenv("SEGD_MODEL_MIRROR", weight_env["mirror"])
    monkeypatch.setenv("CORAL_DEEPLAB_CACHE", str(weight_env["cache"]))
    model = applications.CoralDeepLabV3(
        (SIZE, SIZE, 3), alpha=0.5, n_classes=5, weights="pascal_voc", source="google-tflite"
    )
    w = imported[0.5]
    np.testing.assert_array_equal(
        model.get_layer("expanded_conv_16_depthwise").get_weights()[0],
        w["expanded_conv_16_depthwise/kernel"],
    )
    np.testing.assert_array_equal(
        model.get_layer("concat_projection").get_weights()[0], w["concat_projection/kernel"]
    )
    kernel, bias = model.get_layer("logits_semantic").get_weights()
    assert kernel.shape == (1, 1, 256, 5)
    assert not np.any(bias)  # freshly initialised (zeros), not a slice of Google's 21 classes


def test_pascal_voc_keyword_loads_all_21_logits(monkeypatch, weight_env, imported):
    monkeypatch.setenv("SEGD_MODELS_DIR", str(weight_env["models_dir"]))
    monkeypatch.setenv("SEGD_MODEL_MIRROR", weight_env["mirror"])
    monkeypatch.setenv("CORAL_DEEPLAB_CACHE", str(weight_env["cache"]))
    model = applications.CoralDeepLabV3((SIZE, SIZE, 3), weights="pascal_voc", source="google-tflite")
    kernel, bias = model.get_layer("logits_semantic").get_weights()
    np.testing.assert_array_equal(kernel, imported[1.0]["logits_semantic/kernel"])
    np.testing.assert_array_equal(bias, imported[1.0]["logits_semantic/bias"])


def test_v3plus_pascal_voc_loads_the_encoder_only(monkeypatch, weight_env, imported):
    monkeypatch.setenv("SEGD_MODELS_DIR", str(weight_env["models_dir"]))
    monkeypatch.setenv("SEGD_MODEL_MIRROR", weight_env["mirror"])
    monkeypatch.setenv("CORAL_DEEPLAB_CACHE", str(weight_env["cache"]))
    model = applications.CoralDeepLabV3Plus((SIZE, SIZE, 3), alpha=1.0, weights="pascal_voc", source="google-tflite")
    w = imported[1.0]
    np.testing.assert_array_equal(model.get_layer("aspp0").get_weights()[0], w["aspp0/kernel"])
    np.testing.assert_array_equal(model.get_layer("Conv").get_weights()[0], w["Conv/kernel"])
    # decoder batchnorms keep their fresh statistics; encoder ones carry the folded biases
    assert np.all(model.get_layer("decoder_conv0_pointwise_BN").get_weights()[3] == 1.0)
    assert np.all(model.get_layer("aspp0_BN").get_weights()[3] < 1.0)
    assert not np.any(model.get_layer("logits_semantic").get_weights()[1])


def test_mismatched_depth_multiplier_fails_loudly(imported):
    model = applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=1.0)
    with pytest.raises(weights.WeightImportError, match="kernel shape"):
        weights.apply_weights(model, imported[0.5])


def test_unknown_source_layer_fails_loudly(imported):
    model = applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=0.5)
    extra = dict(imported[0.5])
    extra["aspp1/kernel"] = np.zeros((3, 3, 160, 256), np.float32)
    extra["aspp1/bias"] = np.zeros((256,), np.float32)
    with pytest.raises(weights.WeightImportError, match="aspp1: no such layer"):
        weights.apply_weights(model, extra)


def test_incomplete_source_fails_loudly(imported):
    model = applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=0.5)
    partial = {k: v for k, v in imported[0.5].items() if not k.startswith("expanded_conv_7_")}
    before = model.get_weights()
    with pytest.raises(weights.WeightImportError, match="expanded_conv_7_depthwise"):
        weights.apply_weights(model, partial)
    # checked before assigned: no layer took Google's values
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_imported_weights_are_cached_under_the_source_checksum_and_the_code_version(
    weight_env, imported, test_data
):
    source = (test_data / GOOGLE[1.0]).read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    path = weights.cache_path(weight_env["cache"], "deeplabv3_mnv2_pascal", source)
    assert path.name == f"deeplabv3_mnv2_pascal-{digest[:12]}-{weights.code_version()}.npz"
    assert path.is_file()
    with np.load(path) as cached:
        np.testing.assert_array_equal(cached["aspp0/kernel"], imported[1.0]["aspp0/kernel"])
    assert sorted(p.name for p in weight_env["cache"].iterdir() if not p.name.endswith(".npz")) == []


@pytest.mark.parametrize(
    "damage",
    [lambda data: b"not an npz", lambda data: data[: len(data) // 2], lambda data: data[:-30] + bytes(30)],
    ids=["garbage", "truncated zip", "corrupt zip directory"],
)
def test_a_damaged_cache_entry_is_rebuilt_not_trusted(damage, weight_env, imported, test_data):
    source = (test_data / GOOGLE[0.5]).read_bytes()
    path = weights.cache_path(weight_env["cache"], "deeplabv3_mnv2_dm05_pascal", source)
    path.write_bytes(damage(path.read_bytes()))
    again = weights.pascal_voc_weights(0.5, **weight_env)
    assert sorted(again) == sorted(imported[0.5])
    np.testing.assert_array_equal(again["aspp0/kernel"], imported[0.5]["aspp0/kernel"])
    with np.load(path) as cached:  # rewritten whole
        assert sorted(cached.files) == sorted(imported[0.5])


def test_a_change_to_the_extraction_code_does_not_reuse_old_cache_entries(
    weight_env, imported, test_data, tmp_path, monkeypatch
):
    source = (test_data / GOOGLE[0.5]).read_bytes()
    before = weights.cache_path(weight_env["cache"], "deeplabv3_mnv2_dm05_pascal", source)
    assert before.is_file()
    # The same modules with one changed byte: a new code version, a new entry.
    edited = tmp_path / "model.py"
    edited.write_bytes(Path(segd_tflite_model.__file__).read_bytes() + b"#")
    real_find_spec = weights.importlib.util.find_spec

    def find_spec(name, *args):
        if name == "segd.tflite.model":
            return importlib.machinery.ModuleSpec(name, None, origin=str(edited))
        return real_find_spec(name, *args)

    monkeypatch.setattr(weights.importlib.util, "find_spec", find_spec)
    after = weights.cache_path(weight_env["cache"], "deeplabv3_mnv2_dm05_pascal", source)
    assert after != before and not after.exists()
    weights.pascal_voc_weights(0.5, **weight_env)
    assert after.is_file() and before.is_file()


def test_corrupt_source_file_is_refused(tmp_path, test_data):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    data = bytearray((test_data / GOOGLE[0.5]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (models_dir / GOOGLE[0.5]).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        weights.pascal_voc_weights(0.5, models_dir=models_dir, mirror="", cache=tmp_path / "c")


def test_no_pretrained_weights_for_other_alphas():
    with pytest.raises(ValueError, match="alpha"):
        weights.pascal_voc_weights(0.75)


def test_non_tflite_source_is_refused():
    with pytest.raises(weights.WeightImportError, match="TFLite"):
        weights.extract_weights(b"\x00" * 64)


def test_foreign_architecture_fails_loudly(test_data):
    # EdgeTPU-DeepLab-slim is another backbone: nothing may be half-loaded from it.
    source = weights.extract_weights(
        (test_data / "deeplab_mobilenet_edgetpu_slim_cityscapes_quant.tflite").read_bytes()
    )
    model = applications.CoralDeepLabV3((SIZE, SIZE, 3), n_classes=19)
    before = model.get_layer("Conv").get_weights()[0].copy()
    with pytest.raises(weights.WeightImportError, match="no such layer"):
        weights.apply_weights(model, source)
    np.testing.assert_array_equal(model.get_layer("Conv").get_weights()[0], before)
