"""int8 export: Edge-TPU-clean op set, raw-RGB input quantization, and masks that still match
Google's models after our own post-training quantization (calibrated on real images)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")
cv2 = pytest.importorskip("cv2")

from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from coral_deeplab import applications, export, weights  # noqa: E402
from coral_deeplab.layers import DilatedDepthwiseConv2D  # noqa: E402
from segd.tflite.checker import check_model, format_report  # noqa: E402

GOOGLE = {1.0: "deeplabv3_mnv2_pascal_quant.tflite", 0.5: "deeplabv3_mnv2_dm05_pascal_quant.tflite"}
IMAGES = ("bird_segmentation.bmp", "cat.bmp")
SIZE = 513


def rgb(test_data: Path, name: str) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(test_data / name), cv2.IMREAD_COLOR)[:, :, ::-1])


def rgb_513(test_data: Path, name: str) -> np.ndarray:
    image = rgb(test_data, name)
    if image.shape[:2] != (SIZE, SIZE):
        image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return image


def calibration_set(test_data: Path) -> list[np.ndarray]:
    """The shared photos plus mirrored and cropped variants: 12 real images."""
    out = []
    for name in ("bird_segmentation.bmp", "cat.bmp", "bird.bmp", "cityscapes_segmentation.bmp"):
        image = rgb(test_data, name)
        h, w = image.shape[:2]
        out += [image, image[:, ::-1], image[h // 4 :, w // 4 :]]
    return out


def run(model: bytes | Path, image: np.ndarray) -> tuple[np.ndarray, dict]:
    if isinstance(model, Path):
        interpreter = Interpreter(model_path=str(model))
    else:
        interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    return interpreter.get_tensor(out["index"])[0], out


def mask_from_export(data: bytes, image: np.ndarray) -> np.ndarray:
    q, details = run(data, image)
    scale, zero_point = details["quantization"]
    logits = (q.astype(np.float32) - zero_point) * scale
    up = tf.compat.v1.image.resize_bilinear(logits[None], (SIZE, SIZE), align_corners=True)
    return np.argmax(up[0].numpy(), axis=-1)


def pixel_iou(mask: np.ndarray, reference: np.ndarray) -> float:
    same = int(np.sum(mask == reference))
    return same / (2 * reference.size - same)


@pytest.fixture(scope="session")
def exports(tmp_path_factory, test_data):
    """v3 with Google's weights at DM1 and DM0.5, converted once per session."""
    root = tmp_path_factory.mktemp("cdl_export")
    calibration = calibration_set(test_data)
    out = {}
    for alpha in (1.0, 0.5):
        model = applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=alpha)
        weights.load_pascal_voc(
            model,
            alpha=alpha,
            models_dir=root / "models",
            mirror=str(test_data),
            cache=root / "cache",
        )
        start = time.perf_counter()
        out[alpha] = export.to_tflite(model, calibration, num_calibration=len(calibration))
        print(f"\nexport DM{alpha}: {time.perf_counter() - start:.1f} s, {len(out[alpha])} bytes")
        print(f"op histogram DM{alpha}: {export.op_histogram(out[alpha])}")
    return out


def _ops(data: bytes) -> list[tuple[str, Any, list[int], list[int]]]:
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    rows = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        rows.append((name, op.builtinOptions, list(op.inputs), list(op.outputs)))
    return rows


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_export_takes_raw_rgb_bytes(exports, alpha):
    assert export.input_quantization(exports[alpha]) == (0.0078125, 128, "uint8")
    assert export.export_problems(exports[alpha]) == []


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_dilated_depthwise_convs_stay_fused(exports, alpha):
    ops = _ops(exports[alpha])
    names = [name for name, *_ in ops]
    assert "SPACE_TO_BATCH_ND" not in names and "BATCH_TO_SPACE_ND" not in names
    dilated = [
        opts
        for name, opts, *_ in ops
        if name == "DEPTHWISE_CONV_2D" and opts.dilationHFactor == 2 and opts.dilationWFactor == 2
    ]
    assert len(dilated) == 3  # expanded_conv_14..16, as in Google's files


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_only_quantize_is_the_input_conversion(exports, alpha):
    data = exports[alpha]
    graph = schema.ModelT.InitFromPackedBuf(bytearray(data), 0).subgraphs[0]
    ops = _ops(data)
    quantize = [(i, inputs) for i, (name, _, inputs, _) in enumerate(ops) if name == "QUANTIZE"]
    assert quantize == [(0, [graph.inputs[0]])]
    hist = export.op_histogram(data)
    assert not {"DEQUANTIZE", "MUL", "TILE", "RESIZE_BILINEAR", "ARG_MAX"} & set(hist)
    assert set(hist) == {
        "QUANTIZE",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
    }


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_output_is_int8_logits_at_stride_16(exports, alpha):
    interpreter = Interpreter(model_content=exports[alpha])
    out = interpreter.get_output_details()[0]
    assert tuple(out["shape"]) == (1, 33, 33, 21)
    assert out["dtype"] == np.int8


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_checker_predicts_every_op_maps_to_one_edgetpu_segment(exports, alpha):
    report = check_model(exports[alpha])
    assert report.fully_mapped, format_report(report)
    assert report.stop_index is None
    assert report.segment_end == report.n_ops - 1


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("image_name", IMAGES)
def test_int8_export_agrees_with_google(exports, test_data, alpha, image_name):
    image = rgb_513(test_data, image_name)
    ours = mask_from_export(exports[alpha], image)
    google, _ = run(test_data / GOOGLE[alpha], image)
    agreement = float(np.mean(ours == google))
    print(f"int8 DM{alpha} {image_name}: {agreement:.4f} of pixels agree with Google")
    assert agreement >= 0.97


@pytest.mark.parametrize(("alpha", "minimum"), [(1.0, 0.95), (0.5, 0.90)])
def test_int8_export_segments_the_bird(exports, test_data, alpha, minimum):
    # 0.90 is the Coral project's own acceptance threshold for DeepLab on this image; Google's
    # models score 0.958 (DM1) and 0.924 (DM0.5) here.
    reference = cv2.imread(str(test_data / "bird_segmentation_mask.bmp"), cv2.IMREAD_UNCHANGED)
    ours = mask_from_export(exports[alpha], rgb_513(test_data, "bird_segmentation.bmp"))
    iou = pixel_iou(ours, reference)
    print(f"int8 DM{alpha} bird pixel-IoU vs reference mask: {iou:.4f}")
    assert iou > minimum


def test_v3plus_export_is_clean_up_to_the_decoder_resize(test_data):
    # The decoder's bilinear 9 -> 33 upsample is the one op the static checker cannot vouch
    # for (the compiler's resize precision limit is undisclosed); everything before it maps.
    model = applications.CoralDeepLabV3Plus((129, 129, 3), alpha=0.5)
    data = export.to_tflite(model, calibration_set(test_data)[:3], num_calibration=3)
    assert export.export_problems(data) == []
    ops = _ops(data)
    resize = [i for i, (name, *_) in enumerate(ops) if name == "RESIZE_BILINEAR"]
    assert len(resize) == 1
    options = ops[resize[0]][1]
    assert options.alignCorners and not options.halfPixelCenters
    report = check_model(data)
    assert report.stop_index == resize[0], format_report(report)
    assert all(row.mapped for row in report.rows[: resize[0]])
    assert Interpreter(model_content=data).get_output_details()[0]["shape"].tolist() == [
        1,
        33,
        33,
        21,
    ]


def _tiny_dilated(layer: Any) -> Any:
    inputs = keras.Input((33, 33, 3))
    return keras.Model(inputs, layer(keras.layers.Conv2D(8, 1)(inputs)))


def _int8_dynamic_batch(model: Any) -> bytes:
    """Plain ``from_keras_model`` conversion: keeps keras' dynamic batch dimension."""
    image = np.random.default_rng(0).integers(0, 256, size=(33, 33, 3), dtype=np.uint8)
    batches = export.calibration_batches([image], (33, 33), limit=1)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([b] for b in batches)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def test_stock_dilated_depthwise_with_dynamic_batch_is_flagged():
    # With keras' dynamic batch the converter lowers a dilated keras DepthwiseConv2D to
    # SPACE_TO_BATCH_ND / DEPTHWISE_CONV_2D / BATCH_TO_SPACE_ND; export_problems must say so.
    stock = keras.layers.DepthwiseConv2D(3, padding="same", dilation_rate=2)
    problems = export.export_problems(_int8_dynamic_batch(_tiny_dilated(stock)))
    assert any("SPACE_TO_BATCH_ND" in p for p in problems), problems
    assert any("BATCH_TO_SPACE_ND" in p for p in problems), problems
    assert any("dynamic shape" in p for p in problems), problems


def test_dilated_layer_stays_one_op_even_with_dynamic_batch():
    ours = DilatedDepthwiseConv2D(3, padding="same", dilation_rate=2)
    hist = export.op_histogram(_int8_dynamic_batch(_tiny_dilated(ours)))
    assert hist.get("DEPTHWISE_CONV_2D") == 1
    assert "SPACE_TO_BATCH_ND" not in hist and "BATCH_TO_SPACE_ND" not in hist


def test_to_tflite_traces_a_static_batch_of_one():
    stock = keras.layers.DepthwiseConv2D(3, padding="same", dilation_rate=2)
    image = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    data = export.to_tflite(_tiny_dilated(stock), [image], num_calibration=1)
    assert export.export_problems(data) == []
    details = Interpreter(model_content=data).get_input_details()[0]
    assert details["shape_signature"].tolist() == [1, 33, 33, 3]


def test_calibration_images_load_from_a_directory_as_rgb(tmp_path):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, size=(20 + i, 30, 3), dtype=np.uint8) for i in range(2)]
    for i, image in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i}.png"), image[:, :, ::-1])  # cv2 writes BGR
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = list(export.load_calibration_images(tmp_path))
    assert len(loaded) == 2
    for got, want in zip(loaded, images, strict=True):
        np.testing.assert_array_equal(got, want)


def test_calibration_batches_are_normalised_and_pin_the_input_range():
    image = np.full((10, 12, 3), 200, np.uint8)
    (batch,) = export.calibration_batches([image], (8, 8), limit=4)
    assert batch.shape == (1, 8, 8, 3) and batch.dtype == np.float32
    assert batch.min() == -1.0 and batch.max() == 127 / 128
    assert np.all(batch[0, 1:, 1:] == (200 - 128) / 128)


def test_calibration_resizes_images_exactly_as_segd_serves_them(test_data):
    from segd.preprocess import decode_image, fit_to_input

    image = decode_image((test_data / "bird.bmp").read_bytes(), max_pixels=10**8).rgb
    assert image.shape[0] > 129 and image.shape[1] > 129  # shrinking: segd uses area averaging
    (batch,) = export.calibration_batches([image], (129, 129), limit=1)
    served = fit_to_input(image, (129, 129), keep_aspect=False)[0]
    expected = (served.astype(np.float32) - 128) / 128
    expected[0, 0, 0], expected[0, 0, 1] = -1.0, 127 / 128  # the two range-pinning values
    np.testing.assert_array_equal(batch[0], expected)
    assert not np.array_equal(cv2.resize(image, (129, 129), interpolation=cv2.INTER_LINEAR), served)


def test_calibration_files_are_decoded_by_segds_decoder(tmp_path):
    from segd.preprocess import decode_image

    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, size=(40, 50, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(50) < 25, 40, 255)  # half the image mostly transparent
    cv2.imwrite(str(tmp_path / "a.png"), rgba[..., [2, 1, 0, 3]])
    deep = rng.integers(0, 65536, size=(30, 20, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "b.png"), deep)
    loaded = list(export.load_calibration_images(tmp_path))
    for got, name in zip(loaded, ("a.png", "b.png"), strict=True):
        data = (tmp_path / name).read_bytes()
        np.testing.assert_array_equal(got, decode_image(data, max_pixels=10**6).rgb)
    # cv2.imread would have dropped the alpha instead of compositing it as the daemon does.
    assert not np.array_equal(loaded[0], cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_COLOR)[:, :, ::-1])
    (tmp_path / "c.png").write_bytes((tmp_path / "a.png").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot decode calibration image .*c\.png"):
        list(export.load_calibration_images(tmp_path))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8)],
)
def test_calibration_rejects_non_rgb_uint8_arrays(bad):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        list(export.load_calibration_images([bad]))


def test_calibration_directory_without_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        list(export.load_calibration_images(tmp_path))
