"""The model zoo: publishing an export into a models dir, ``segd models build``, and
``coral_deeplab.from_precompiled`` — each checked by serving the result with segd's engine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, pixel_iou, read_mask_png, read_rgb
from hypothesis import given, settings
from hypothesis import strategies as st

from coral_deeplab import pretrained, zoo
from segd import geometry, manifest
from segd.engine import Segmenter
from segd.errors import ChecksumMismatch, UnknownModel
from segd.tflite.compiler import EdgeTpuCompileFailed
from segd.tflite.surgery import strip_tail
from segd.variants import load_manifest

GOOGLE_DM05 = "deeplabv3_mnv2_dm05_pascal_quant.tflite"
BIRD = 3
PASCAL = load_manifest().get("deeplabv3_mnv2_pascal").labels.names
BUILT = "cdl_v3_dm05_513_pascal"
CALIBRATION = ("bird.bmp", "cat.bmp", "cityscapes_segmentation.bmp")  # bird_segmentation held out


def google_logits_model(test_data: Path) -> bytes:
    """Google's DM0.5 CPU model cut to its uint8 logits: a real logits .tflite, no TF needed."""
    return strip_tail((test_data / GOOGLE_DM05).read_bytes()).model_bytes


def google_mask(test_data: Path, image: str) -> np.ndarray:
    """Google's own in-graph 513x513 argmax (the file unmodified)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(test_data / GOOGLE_DM05))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], read_rgb(test_data / image)[None])
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]


def segment(seg: Segmenter, test_data: Path, image: str) -> np.ndarray:
    return seg.segment((test_data / image).read_bytes()).mask


def segd(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "segd", *args], capture_output=True, text=True, env=full_env,
        timeout=timeout, cwd=REPO,
    )  # fmt: skip


# --- TOML writer (segd.manifest.dumps, which publish uses) -------------------------------------------------------------------------------

NASTY = ['a "quoted" name', "back\\slash", "new\nline", "tab\tand\x00nul\x1f\x7fdel", '"]\n[evil]\nx = 1',
         "ünïcødé 🐦", "'single'", "", "key = value"]  # fmt: skip


@pytest.mark.parametrize("text", NASTY)
def test_toml_writer_escapes_every_string_it_writes(text: str) -> None:
    data = {"variants": {text or "k": {"description": text, "names": [text, "x"], "n": 3, "f": 0.5, "b": True}}}
    assert tomllib.loads(manifest.dumps(data)) == data


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, alphabet=st.characters(exclude_categories=["Cs"])),
        st.one_of(
            st.text(alphabet=st.characters(exclude_categories=["Cs"])),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
            st.lists(st.text(alphabet=st.characters(exclude_categories=["Cs"])), max_size=4),
        ),
        max_size=5,
    )
)
def test_toml_writer_round_trips_arbitrary_tables(table: dict[str, Any]) -> None:
    data = {"variants": {"v": table}}
    assert tomllib.loads(manifest.dumps(data)) == data


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "\ud800", {1, 2}])
def test_toml_writer_refuses_values_toml_cannot_hold(bad: Any) -> None:
    with pytest.raises(ValueError):
        manifest.dumps({"t": {"x": bad}})


# --- geometry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 8, 20, 32, 40])
def test_output_geometry_follows_the_16k_plus_1_input_rule(k: int) -> None:
    # Logit sides as coral_deeplab's "SAME"-padded builders produce them: (N - 1) / stride + 1.
    for stride in (16, 4):
        side = 16 * k + 1
        n = (side - 1) // stride + 1
        assert zoo.output_geometry((side, side), (n, n)) == (stride, True)
        assert geometry.logits_hw((side, side), stride) == (n, n)
        # 16k inputs: SAME padding puts logit i on pixel 16 i + 15; refused with the reason.
        with pytest.raises(zoo.PublishError, match="even"):
            zoo.output_geometry((16 * k, 16 * k), (16 * k // stride, 16 * k // stride))


@pytest.mark.parametrize(
    ("inp", "logits"),
    [((513, 513), (32, 32)), ((513, 513), (33, 129)), ((100, 100), (7, 7)), ((256, 256), (16, 16)),
     ((129, 129), (9, 1)), ((129, 97), (9, 9))],
)  # fmt: skip
def test_output_geometry_refuses_grids_that_do_not_line_up(inp: tuple[int, int], logits: tuple[int, int]) -> None:
    with pytest.raises(zoo.PublishError):
        zoo.output_geometry(inp, logits)


@pytest.mark.parametrize(
    ("side", "message"),
    [(512, r"not 16k\+1 \(use 497 or 513.*16 i \+ 15"), (500, r"use 497 or 513"), (32, "minimum"),
     (513.5, "integer"), ("513", "integer"), (True, "integer")],
)  # fmt: skip
def test_input_sides_other_than_16k_plus_1_are_refused_with_the_reason(side: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        geometry.check_side(side)
    assert geometry.check_side(513) == 513 and geometry.check_input_hw((65, 129)) == (65, 129)


def test_only_the_published_depth_multipliers_are_accepted() -> None:
    assert geometry.check_alpha(0.5) == 0.5 and geometry.check_alpha(1) == 1.0
    for bad in (0.75, 1.4, True, "1.0", None):
        with pytest.raises(ValueError, match="alpha"):
            geometry.check_alpha(bad)
    with pytest.raises(ValueError, match="16k\\+1"):
        zoo.build(input_size=512, calibration=[])  # refused before any work


# --- publish (TF-free, on Google's logits) ------------------------------------------------------


def test_published_model_is_a_variant_segd_serves(test_data: Path, tmp_path: Path) -> None:
    data = google_logits_model(test_data)
    result = zoo.publish(data, name="g05", labels=PASCAL, models_dir=tmp_path, description='say "hi"\n')
    assert result.cpu_path.read_bytes() == data
    assert result.edgetpu_path is None and result.compile_log is None
    assert "not on PATH" in (result.compile_skipped_reason or "")
    assert result.report.stop_index == 64  # Google's image-pooling resize, as in its _edgetpu file

    raw = tomllib.loads(result.manifest_path.read_text())["variants"]["g05"]
    assert raw["files"]["cpu"] == {"name": "g05.tflite", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert "edgetpu" not in raw["files"]
    assert raw["output"] == {"kind": "logits", "shape": [1, 33, 33, 21], "dtype": "uint8", "stride": 16,
                             "align_corners": True, "strip_tail": False}  # fmt: skip
    assert raw["build"]["checker"].startswith("64/69 ops mapped")

    variant = load_manifest(models_dir=tmp_path).get("g05")
    assert variant.description == 'say "hi"\n' and variant.labels.names == PASCAL
    assert variant.source == result.manifest_path
    seg = Segmenter.open(variant, models_dir=tmp_path)
    # The engine's own upsample of the published logits reproduces Google's in-graph argmax.
    agreement = float(np.mean(segment(seg, test_data, "bird_segmentation.bmp") == google_mask(test_data, "bird_segmentation.bmp")))
    assert agreement >= 0.99, agreement


def test_publishing_again_replaces_the_files_and_the_entry(test_data: Path, tmp_path: Path) -> None:
    data = google_logits_model(test_data)
    zoo.publish(data, name="m", labels=PASCAL, models_dir=tmp_path, description="first")
    other = strip_tail((test_data / "deeplabv3_mnv2_pascal_quant.tflite").read_bytes()).model_bytes
    zoo.publish(other, name="m", labels=PASCAL, models_dir=tmp_path, description="second", palette=[[1, 2, 3]])
    variant = load_manifest(models_dir=tmp_path).get("m")
    assert variant.description == "second"
    assert variant.cpu.sha256 == hashlib.sha256(other).hexdigest()
    assert variant.labels.palette[0].tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite", "m.toml"]  # no temporaries left


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../evil"}, "must match"),
        ({"name": "a/b"}, "must match"),
        ({"name": ""}, "must match"),
        ({"name": "deeplabv3_mnv2_pascal"}, "already defined"),
        ({"labels": PASCAL[:20]}, "21 classes but 20 labels"),
        ({"labels": []}, "at least one class"),
        ({"std": (128, 0, 128)}, "std must not be zero"),
        ({"mean": (1, 2)}, "3 finite numbers"),
        ({"palette": "rainbow"}, "palette"),
    ],
)
def test_publish_refuses_bad_requests_and_writes_nothing(
    test_data: Path, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"name": "ok", "labels": PASCAL, "models_dir": tmp_path, **kwargs}
    with pytest.raises(zoo.PublishError, match=message):
        zoo.publish(google_logits_model(test_data), **args)
    assert not list(tmp_path.glob("*.tflite")) and not list(tmp_path.glob("*.toml"))


def test_publish_refuses_a_model_that_still_ends_in_argmax(test_data: Path, tmp_path: Path) -> None:
    with pytest.raises(zoo.PublishError, match="strip_tail"):
        zoo.publish((test_data / GOOGLE_DM05).read_bytes(), name="x", labels=PASCAL, models_dir=tmp_path)


def test_publish_without_compiling_says_so(test_data: Path, tmp_path: Path) -> None:
    result = zoo.publish(google_logits_model(test_data), name="x", labels=PASCAL, models_dir=tmp_path, compile=False)
    assert result.compile_skipped_reason == "not requested (compile=False)"


def _compiler_double(bin_dir: Path, *, fail: bool = False) -> None:
    """An ``edgetpu_compiler`` stand-in (the real one cannot be installed here): it copies the
    input to ``<out>/<stem>_edgetpu.tflite`` and prints real compiler-16 stdout
    (tests/data/edgetpu_compiler). It exercises publish's plumbing, not a compilation."""
    log = REPO / "tests" / "data" / "edgetpu_compiler" / "yolov5s_int8_224_stdout_v16.txt"
    script = f"""#!{sys.executable}
import pathlib, shutil, sys
args = sys.argv[1:]
if {fail!r}:
    print("Edge TPU Compiler version 16.0.384591198\\nInvalid model: unsupported op", file=sys.stderr)
    sys.exit(1)
out = pathlib.Path(args[args.index("-o") + 1]); src = pathlib.Path(args[-1])
shutil.copyfile(src, out / (src.stem + "_edgetpu.tflite"))
sys.stdout.write(pathlib.Path({str(log)!r}).read_text())
"""
    exe = bin_dir / "edgetpu_compiler"
    exe.write_text(script)
    exe.chmod(0o755)


def test_publish_with_a_compiler_on_path_records_the_edgetpu_file_and_its_log(
    test_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _compiler_double(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    mdir = tmp_path / "models"
    data = google_logits_model(test_data)
    result = zoo.publish(data, name="c", labels=PASCAL, models_dir=mdir)
    assert result.edgetpu_path == mdir / "c_edgetpu.tflite" and result.compile_skipped_reason is None
    assert result.compile_log is not None and result.compile_log.compiler_version == "16.0.384591198"
    variant = load_manifest(models_dir=mdir).get("c")
    assert variant.edgetpu is not None and variant.edgetpu.name == "c_edgetpu.tflite"
    assert variant.edgetpu.sha256 == hashlib.sha256(result.edgetpu_path.read_bytes()).hexdigest()
    raw = tomllib.loads(result.manifest_path.read_text())["variants"]["c"]["build"]
    assert raw["compiler"] == "16.0.384591198" and raw["compiler_ops_mapped"] == "289/294"
    # No Edge TPU here: auto mode says why and serves the CPU twin.
    seg = Segmenter.open(variant, models_dir=mdir)
    assert seg.selection is not None and seg.selection.backend == "cpu"


def test_a_failing_compiler_aborts_the_publish_before_anything_is_written(
    test_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _compiler_double(tmp_path, fail=True)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    mdir = tmp_path / "models"
    with pytest.raises(EdgeTpuCompileFailed, match="unsupported op"):
        zoo.publish(google_logits_model(test_data), name="c", labels=PASCAL, models_dir=mdir)
    assert list(mdir.iterdir()) == []


def test_republishing_without_compiling_removes_the_old_edgetpu_file(
    test_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _compiler_double(bin_dir)
    mdir = tmp_path / "models"
    data = google_logits_model(test_data)
    with monkeypatch.context() as m:
        m.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        assert zoo.publish(data, name="c", labels=PASCAL, models_dir=mdir).edgetpu_path is not None
    other = strip_tail((test_data / "deeplabv3_mnv2_pascal_quant.tflite").read_bytes()).model_bytes
    result = zoo.publish(other, name="c", labels=PASCAL, models_dir=mdir, compile=False)
    assert result.edgetpu_path is None
    # The old compiled file was another network; no manifest describes it any more.
    assert sorted(p.name for p in mdir.iterdir()) == ["c.tflite", "c.toml"]
    assert load_manifest(models_dir=mdir).get("c").edgetpu is None


def test_atomic_write_replaces_whole_files_with_the_asked_mode(tmp_path: Path) -> None:
    from segd.fsutil import atomic_write

    target = tmp_path / "f.bin"
    old_umask = os.umask(0o077)
    try:
        atomic_write(target, b"one")
        assert target.read_bytes() == b"one" and target.stat().st_mode & 0o777 == 0o644
        atomic_write(target, "twø", mode=0o600)
        assert target.read_text() == "twø" and target.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)
    with pytest.raises(TypeError):
        atomic_write(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "twø"  # a failed write leaves the old file, and no temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "f", b"x")


# --- from_precompiled ---------------------------------------------------------------------------


def test_from_precompiled_pulls_a_variant_checksum_verified_and_segments(test_data: Path, tmp_path: Path) -> None:
    seg = zoo.from_precompiled("deeplabv3_mnv2_dm05_pascal", models_dir=tmp_path, mirror=str(test_data))
    assert isinstance(seg, Segmenter) and seg.selection is not None
    assert seg.selection.backend == "cpu" and seg.selection.reason  # no Edge TPU here, and it says why
    assert sorted(p.name for p in tmp_path.iterdir()) == [GOOGLE_DM05]  # only what the CPU backend needs
    mask = segment(seg, test_data, "bird_segmentation.bmp")
    assert float(np.mean(mask == google_mask(test_data, "bird_segmentation.bmp"))) >= 0.99


def test_from_precompiled_refuses_a_corrupt_file(test_data: Path, tmp_path: Path) -> None:
    corrupt = bytearray((test_data / GOOGLE_DM05).read_bytes())
    corrupt[5000] ^= 0xFF
    (tmp_path / GOOGLE_DM05).write_bytes(bytes(corrupt))
    with pytest.raises(ChecksumMismatch):
        zoo.from_precompiled("deeplabv3_mnv2_dm05_pascal", models_dir=tmp_path, mirror=str(test_data))


def test_from_precompiled_opens_a_published_file_by_path(test_data: Path, tmp_path: Path) -> None:
    result = zoo.publish(google_logits_model(test_data), name="pub", labels=PASCAL, models_dir=tmp_path)
    seg = zoo.from_precompiled(result.cpu_path, models_dir=tmp_path / "elsewhere")
    assert seg.variant.name == "pub" and seg.selection is not None and seg.selection.path == result.cpu_path
    assert BIRD in np.unique(segment(seg, test_data, "bird_segmentation.bmp"))


def test_from_precompiled_recognises_a_known_file_under_another_name(test_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "my copy.tflite"
    shutil.copyfile(test_data / GOOGLE_DM05, path)
    seg = zoo.from_precompiled(str(path), models_dir=tmp_path / "empty")
    assert seg.variant.name == "deeplabv3_mnv2_dm05_pascal"
    assert tuple(seg.runner.output.shape) == (1, 33, 33, 21)  # the manifest's strip_tail applied
    mask = segment(seg, test_data, "bird_segmentation.bmp")
    assert float(np.mean(mask == google_mask(test_data, "bird_segmentation.bmp"))) >= 0.99


def test_from_precompiled_refuses_an_unknown_file(test_data: Path, tmp_path: Path) -> None:
    path = tmp_path / "mystery.tflite"
    path.write_bytes(google_logits_model(test_data))
    with pytest.raises(UnknownModel, match="no manifest describes"):
        zoo.from_precompiled(path, models_dir=tmp_path / "empty")


def test_from_precompiled_is_importable_without_tensorflow() -> None:
    code = (
        "import sys, coral_deeplab; f = coral_deeplab.from_precompiled; "
        "import segd.engine; assert 'tensorflow' not in sys.modules, 'tensorflow imported'; print(f.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "coral_deeplab.zoo"


# --- segd models build (TensorFlow, in a subprocess) ----------------------------------------------


def test_models_build_requires_real_calibration_images(tmp_path: Path) -> None:
    out = segd("models", "build", "--models-dir", str(tmp_path))
    assert out.returncode == 2 and "--calibration DIR" in out.stderr and "Traceback" not in out.stderr
    out = segd("models", "build", "--calibration", str(tmp_path / "nope"), "--models-dir", str(tmp_path))
    assert out.returncode == 2 and "not a directory" in out.stderr


def test_models_build_without_tensorflow_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['tensorflow'] = None; from segd.cli import main; "
        f"sys.exit(main(['models', 'build', '--calibration', {str(tmp_path)!r}, '--models-dir', {str(tmp_path)!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "pip install 'segd[train]'" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def built(test_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``segd models build --alpha 0.5`` run once as a user would: 3 calibration photos,
    Google's source model fetched through the mirror into a fresh models dir, its own cache."""
    pytest.importorskip("tensorflow")
    root = tmp_path_factory.mktemp("zoo_build")
    calibration = root / "calibration"
    calibration.mkdir()
    for name in CALIBRATION:
        (calibration / name).symlink_to(test_data / name)
    mdir, cache = root / "models", root / "cache"
    out = segd(
        "models", "build", "--alpha", "0.5", "--input-size", "513", "--calibration", str(calibration),
        "--models-dir", str(mdir), "--mirror", str(test_data), env={"CORAL_DEEPLAB_CACHE": str(cache)},
    )  # fmt: skip
    return {"out": out, "models": mdir, "cache": cache, "calibration": calibration}


@pytest.mark.tf
def test_models_build_publishes_a_variant_the_checker_predicts_fully_mapped(built: dict[str, Any]) -> None:
    out = built["out"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == BUILT
    assert "Edge TPU check: 70/70 ops mapped to the Edge TPU" in out.stderr
    assert "exported (3 calibration images)" in out.stderr
    assert "no Edge TPU file: edgetpu_compiler is not on PATH" in out.stderr
    variant = load_manifest(models_dir=built["models"]).get(BUILT)
    assert variant.output.dtype == "int8" and variant.output.align_corners and variant.output.stride == 16
    assert variant.input.dtype == "uint8" and variant.input.shape == (1, 513, 513, 3)
    assert variant.edgetpu is None
    assert "deeplabv3_mnv2_dm05_pascal" in variant.description
    assert (built["models"] / GOOGLE_DM05).is_file()  # the weight source came through the mirror


@pytest.mark.tf
def test_segd_segment_runs_the_built_model(built: dict[str, Any], test_data: Path, tmp_path: Path) -> None:
    assert built["out"].returncode == 0, built["out"].stderr[-3000:]
    image = test_data / "bird_segmentation.bmp"
    out = segd("segment", str(image), "--model", BUILT, "--models-dir", str(built["models"]))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["model"] == BUILT and summary["backend"] == "cpu"
    areas = {c["label"]: c["fraction"] for c in summary["classes"]}
    assert areas.get("bird", 0) > 0.1, areas
    png = tmp_path / "mask.png"
    out = segd("segment", str(image), "--model", BUILT, "--models-dir", str(built["models"]),
               "--format", "png", "-o", str(png))  # fmt: skip
    assert out.returncode == 0, out.stderr
    import cv2

    reference = cv2.imread(str(test_data / "bird_segmentation_mask.bmp"), cv2.IMREAD_UNCHANGED)
    iou = pixel_iou(read_mask_png(png.read_bytes()), reference)
    print(f"built DM0.5 via segd segment: bird pixel-IoU vs reference {iou:.4f}")
    assert iou > 0.90  # the Coral project's own threshold for DeepLab on this image


@pytest.mark.tf
def test_our_export_published_elsewhere_matches_google_through_the_engine(
    built: dict[str, Any], test_data: Path, tmp_path: Path
) -> None:
    assert built["out"].returncode == 0, built["out"].stderr[-3000:]
    ours = (built["models"] / f"{BUILT}.tflite").read_bytes()
    result = zoo.publish(ours, name="ours", labels=PASCAL, models_dir=tmp_path, description="DM0.5 export")
    assert result.report.fully_mapped
    manifest = load_manifest(models_dir=tmp_path)
    seg = Segmenter.open(manifest.get("ours"), models_dir=tmp_path)
    mask = segment(seg, test_data, "bird_segmentation.bmp")
    agreement = float(np.mean(mask == google_mask(test_data, "bird_segmentation.bmp")))
    print(f"engine on our published DM0.5 export vs Google's in-graph argmax: {agreement:.4f}")
    assert agreement >= 0.97
    assert BIRD in np.unique(mask)


@pytest.mark.tf
def test_a_second_build_with_the_same_inputs_comes_from_the_export_cache(
    built: dict[str, Any], test_data: Path, tmp_path: Path
) -> None:
    assert built["out"].returncode == 0, built["out"].stderr[-3000:]
    again, _ = zoo.build(
        alpha=0.5, calibration=built["calibration"], name="again", models_dir=built["models"],
        mirror=str(test_data), cache=built["cache"] / "exports",
    )  # fmt: skip
    assert again.from_cache
    assert again.tflite == (built["models"] / f"{BUILT}.tflite").read_bytes()
    assert load_manifest(models_dir=built["models"]).get("again").cpu.sha256 == hashlib.sha256(again.tflite).hexdigest()


def test_export_cache_key_changes_with_every_input() -> None:
    images = [np.zeros((4, 4, 3), np.uint8)]
    base: dict[str, Any] = {"source_sha256": "a" * 64, "calibration": images, "variant": "v3", "alpha": 0.5, "input_size": 513}
    key = zoo.export_cache_key(**base)
    assert key == zoo.export_cache_key(**base)
    changes: list[dict[str, Any]] = [
        {"source_sha256": "b" * 64},
        {"calibration": [np.ones((4, 4, 3), np.uint8)]},
        {"calibration": [np.zeros((4, 4, 3), np.uint8).reshape(2, 8, 3)]},
        {"variant": "v3plus"},
        {"alpha": 1.0},
        {"input_size": 512},
    ]
    for change in changes:
        assert zoo.export_cache_key(**{**base, **change}) != key, change


@pytest.mark.parametrize("module", zoo._EXPORT_CODE)
def test_export_cache_key_changes_with_the_code_of_every_module_that_shapes_an_export(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base: dict[str, Any] = {"source_sha256": "a" * 64, "calibration": [np.zeros((4, 4, 3), np.uint8)],
                            "variant": "v3", "alpha": 0.5, "input_size": 513}  # fmt: skip
    key = zoo.export_cache_key(**base)
    real = pretrained._module_source
    monkeypatch.setattr(pretrained, "_module_source", lambda name: real(name) + (b"#" if name == module else b""))
    assert zoo.export_cache_key(**base) != key


def test_the_export_cache_key_covers_the_flatbuffer_reader_and_calibration_preprocessing() -> None:
    assert {"segd.tflite.model", "coral_deeplab.weights", "segd.preprocess"} <= set(zoo._EXPORT_CODE)


@pytest.mark.tf
def test_v3plus_build_publishes_stride_4_logits_and_says_the_decoder_is_untrained(
    test_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorflow")
    monkeypatch.setenv("CORAL_DEEPLAB_CACHE", str(tmp_path / "cache"))  # imported weights land here
    built, result = zoo.build(
        variant="v3plus", alpha=0.5, input_size=129, calibration=[read_rgb(test_data / "bird.bmp")],
        models_dir=tmp_path / "models", mirror=str(test_data), cache=False,
    )  # fmt: skip
    variant = load_manifest(models_dir=tmp_path / "models").get("cdl_v3plus_dm05_129_pascal")
    assert variant.output.shape == (1, 33, 33, 21) and variant.output.stride == 4
    assert variant.output.align_corners  # 129 = 16 * 8 + 1
    assert "ONLY THE ENCODER IS PRETRAINED" in variant.description
    # The decoder's bilinear upsample is the one op the checker cannot vouch for.
    stop = result.report.stop_index
    assert stop is not None and result.report.rows[stop].op == "RESIZE_BILINEAR"
    assert not built.from_cache and built.cache_path is None
    assert list((tmp_path / "cache").glob("*.npz")) and not (tmp_path / "cache" / "exports").exists()
    seg = Segmenter.open(variant, models_dir=tmp_path / "models")
    assert seg.segment((test_data / "cat.bmp").read_bytes()).mask.shape == read_rgb(test_data / "cat.bmp").shape[:2]
