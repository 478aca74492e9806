"""The original coral-deeplab's trained .h5 weights load into our models (by a name table
derived from its source) and give the original network's outputs.

Google Drive is unreachable here, so the .h5 files are stand-ins: models built with the
original's layer names and architecture (tests/original_architecture.py), random weights,
saved as whole-model .h5 like the published ones, served by a local Drive imitation."""

from __future__ import annotations

import hashlib
import socket
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.tf
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("tf_keras")

import original_architecture  # noqa: E402
from drive_imitation import DriveImitation  # noqa: E402

from coral_deeplab import applications, original_weights  # noqa: E402
from segd.pins import read_pins  # noqa: E402

SIZE = 129


def saved_original(tmp_path: Path, arch: str, alpha: float, size: int = SIZE, seed: int = 0) -> tuple[keras.Model, Path]:
    ref = original_architecture.build(arch, size, alpha)
    original_architecture.randomize(ref, seed)
    path = tmp_path / f"{arch}_{alpha}_{size}.h5"
    ref.save(path, save_format="h5")
    return ref, path


def builder(arch: str):  # type: ignore[no-untyped-def]
    return applications.CoralDeepLabV3 if arch == "v3" else applications.CoralDeepLabV3Plus


@pytest.mark.parametrize("arch", ["v3", "v3plus"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_every_original_weight_maps_onto_our_layers(arch: str, alpha: float, tmp_path: Path) -> None:
    """The name table covers the original's whole layer list, both ways, shapes included."""
    ref, path = saved_original(tmp_path, arch, alpha, size=65)
    ours = builder(arch)((65, 65, 3), alpha=alpha, weights=path, source="coral-deeplab")
    original = {layer.name for layer in ref.layers if layer.weights}
    mapped = {original_weights.segd_layer_name(n) for n in original}
    assert mapped == {layer.name for layer in ours.layers if layer.weights}
    assert len(original) == len(mapped)  # one to one
    assert {"expanded_conv_16/depthwise/BatchNorm", "logits/semantic"} <= original
    if arch == "v3plus":
        assert {"skip_con_conv", "decoder_conv_1", "decoder_conv_2/BatchNorm"} <= original


@pytest.mark.parametrize("arch", ["v3", "v3plus"])
def test_loaded_model_gives_the_original_networks_outputs(arch: str, tmp_path: Path) -> None:
    ref, path = saved_original(tmp_path, arch, 0.5)
    ours = builder(arch)((SIZE, SIZE, 3), alpha=0.5, weights=path, source="coral-deeplab")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float32)
    theirs = ref(pixels / 255.0, training=False).numpy()  # the original trains on 0..1 images
    mine = ours((pixels - 128.0) / 128.0, training=False).numpy()  # ours: (pixel - 128) / 128
    assert mine.shape == theirs.shape == (2, *((SIZE - 1) // (16 if arch == "v3" else 4) + 1,) * 2, 21)
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4 * scale)
    assert (mine.argmax(-1) == theirs.argmax(-1)).mean() > 0.999


def test_a_layer_missing_from_the_file_is_named(tmp_path: Path) -> None:
    import h5py

    _, path = saved_original(tmp_path, "v3", 0.5, size=65)
    with h5py.File(path, "r+") as f:
        names = [n for n in f["model_weights"].attrs["layer_names"] if original_weights._text(n) != "aspp0"]
        f["model_weights"].attrs["layer_names"] = names
    with pytest.raises(original_weights.WeightImportError, match="aspp0"):
        applications.CoralDeepLabV3((65, 65, 3), alpha=0.5, weights=path, source="coral-deeplab")


@pytest.fixture
def drive() -> Iterator[DriveImitation]:
    imitation = DriveImitation().start()
    yield imitation
    imitation.stop()


def test_h5_fetched_from_drive_is_md5_checked_pinned_and_loads(
    tmp_path: Path, drive: DriveImitation, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, path = saved_original(tmp_path, "v3plus", 0.5)
    data = path.read_bytes()
    drive.add("1StandInOriginalH5file", data, "cookie")
    monkeypatch.setenv("SEGD_GDRIVE_URL", drive.base_url)
    spec = replace(original_weights.file_spec("v3plus", 0.5), md5=hashlib.md5(data).hexdigest(), gdrive_id="1StandInOriginalH5file")
    cache = tmp_path / "cache"
    fetched = original_weights.fetch("v3plus", 0.5, directory=cache, spec=spec)
    assert fetched.name == "deeplabv3plus_mnv2_dm05_voc_trainaug_os4.h5" and fetched.read_bytes() == data
    assert read_pins(cache) == {fetched.name: hashlib.sha256(data).hexdigest()}
    ours = applications.CoralDeepLabV3Plus((SIZE, SIZE, 3), alpha=0.5, weights=fetched, source="coral-deeplab")
    x = np.random.default_rng(2).integers(0, 256, (1, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(ours((x - 128) / 128).numpy(), ref(x / 255).numpy(), rtol=0, atol=1e-3)
    # a wrong file under that id is refused and nothing is kept
    drive.add("1StandInOriginalH5file", data[:-10] + b"0123456789", "direct")
    with pytest.raises(original_weights.WeightsUnavailable, match="md5"):
        original_weights.fetch("v3plus", 0.5, directory=tmp_path / "other", spec=spec)
    assert not list((tmp_path / "other").iterdir())


def test_offline_pascal_voc_falls_back_to_googles_tflite_with_a_warning(
    tmp_path: Path, test_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a Drive nobody answers for
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SEGD_GDRIVE_URL", f"http://127.0.0.1:{port}/uc")
    monkeypatch.setenv("SEGD_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SEGD_MODEL_MIRROR", str(test_data))
    monkeypatch.setenv("CORAL_DEEPLAB_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="importing Google's PASCAL VOC weights"):
        model = applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=0.5, weights="pascal_voc")
    assert "input_to_0_1" not in [layer.name for layer in model.layers]  # Google's layout and scaling
    assert np.any(model.get_layer("logits_semantic").get_weights()[1])  # Google's trained logits
    with pytest.raises(original_weights.WeightsUnavailable, match="cannot reach Google Drive"):
        applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=0.5, weights="pascal_voc", source="coral-deeplab")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit Google choice does not warn
        applications.CoralDeepLabV3((SIZE, SIZE, 3), alpha=0.5, weights="pascal_voc", source="google-tflite")


@pytest.mark.slow  # one int8 TFLite conversion
def test_models_build_with_the_originals_weights_publishes_that_whole_network(
    tmp_path: Path, test_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU model of the same trained network as the original's compiled v3+ file: decoder
    included (Google's files only give v3+ an encoder)."""
    import shutil

    import cv2

    from coral_deeplab import zoo
    from segd.engine import Segmenter
    from segd.pins import write_pin
    from segd.variants import load_manifest, sha256_file

    ref, h5 = saved_original(tmp_path, "v3plus", 0.5, size=65)
    cache = tmp_path / "cache"
    where = cache / "coral-deeplab"
    where.mkdir(parents=True)
    name = original_weights.H5_FILES[("v3plus", 0.5)].name
    shutil.copy(h5, where / name)
    # A stand-in cannot have the real file's md5: its pin stands for a first verified download.
    write_pin(where, name, sha256_file(where / name))
    monkeypatch.setenv("CORAL_DEEPLAB_CACHE", str(cache))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("SEGD_GDRIVE_URL", f"http://127.0.0.1:{s.getsockname()[1]}/uc")
    images = [cv2.cvtColor(cv2.imread(str(test_data / n)), cv2.COLOR_BGR2RGB) for n in ("bird.bmp", "cat.bmp")]
    mdir = tmp_path / "models"
    _, result = zoo.build(variant="v3plus", alpha=0.5, input_size=65, calibration=images, models_dir=mdir,
                          compile=False, cache=False, weights_source="coral-deeplab", mirror=str(test_data))  # fmt: skip
    assert result.manifest_path.stem == "cdl_v3plus_dm05_65_pascal_original"
    variant = load_manifest(models_dir=mdir).get("cdl_v3plus_dm05_65_pascal_original")
    assert "coral-deeplab" in variant.description and "ONLY THE ENCODER" not in variant.description
    assert variant.output.shape == (1, 17, 17, 21) and variant.output.stride == 4
    seg = Segmenter.open(variant, models_dir=mdir, accelerator="cpu")
    try:
        small = cv2.resize(images[0], (65, 65), interpolation=cv2.INTER_AREA)
        raw = seg.infer(seg.prepare(seg.decode(cv2.imencode(".png", small[:, :, ::-1])[1].tobytes())).tensor)
        theirs = ref(small[None].astype(np.float32) / 255.0).numpy()[0]
        out = seg.runner.output
        logits = (raw.astype(np.float32) - out.zero_point) * out.scale
        corr = float(np.corrcoef(logits.ravel(), theirs.ravel())[0, 1])
        agreement = float((raw.argmax(-1) == theirs.argmax(-1)).mean())
        # Random weights give near-uniform logits, so argmax is fragile; the logits must track.
        print(f"int8 export vs the original float network: logits correlation {corr:.3f}, argmax agreement {agreement:.3f}")
        assert corr > 0.9
    finally:
        seg.close()
