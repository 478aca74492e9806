"""The original coral-deeplab's compiled models: manifest entries resolved from a local Google
Drive imitation (interstitials, quota and 404 pages), md5 checked then sha256 pinned, tensors
read from the file, the CPU fallback reported — with real compiled Coral models from the test
data standing in for the Drive files (Google Drive is unreachable here)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from drive_imitation import DriveImitation

from segd.engine import Segmenter, open_runner
from segd.errors import ChecksumMismatch, ModelError
from segd.manifest import dumps as toml_dumps
from segd.pins import PIN_FILE, read_pins
from segd.variants import BUILTIN_MANIFEST, load_manifest, resolve_file

ORIGINAL = ("coral_deeplab_v3_dm1", "coral_deeplab_v3_dm05", "coral_deeplab_v3plus_dm1", "coral_deeplab_v3plus_dm05")
DM1_TPU = "deeplabv3_mnv2_pascal_quant_edgetpu.tflite"
DM05_TPU = "deeplabv3_mnv2_dm05_pascal_quant_edgetpu.tflite"
# Stand-in ids, shaped like Drive's (the real ones are in the manifest).
IDS = {
    "coral_deeplab_v3_dm1": "1StandInFormInterstitial0",
    "coral_deeplab_v3_dm05": "1StandInCookieInterstitial",
    "coral_deeplab_v3plus_dm1": "1StandInQuotaExceededPage",
    "coral_deeplab_v3plus_dm05": "1StandInDeadLink404xxxxxx",
}


def builtin_entries() -> dict[str, dict]:  # type: ignore[type-arg]
    data = tomllib.loads(BUILTIN_MANIFEST.read_text())
    return {n: data["variants"][n] for n in ORIGINAL}


def test_builtin_entries_record_the_originals_drive_ids_and_md5s() -> None:
    """Facts from xadrianzetx/coral-deeplab coral_deeplab/pretrained.py (EdgeTPUModel)."""
    files = {n: e["files"]["edgetpu"] for n, e in builtin_entries().items()}
    assert files["coral_deeplab_v3_dm1"] == {
        "name": "deeplabv3_mnv2_dm1_voc_tainaug_os16_edgetpu.tflite",
        "md5": "6c0ade5b647dc137f6231a9724cf65e6", "gdrive_id": "1YmaaQ9qOxlMfB9eAI7roOqgeo4y7Mosg"}  # fmt: skip
    assert files["coral_deeplab_v3plus_dm05"]["md5"] == "abab0449b81be44efcfab4cacccc7f1b"
    manifest = load_manifest(models_dir=Path("/nonexistent"))
    for name in ORIGINAL:
        v = manifest.get(name)
        assert v.cpu is None and v.tensors_from_file and v.edgetpu is not None and not v.edgetpu.sha256
        assert v.cpu_variant().name == ("deeplabv3_mnv2_pascal" if "dm1" in name else "deeplabv3_mnv2_dm05_pascal")
        assert (v.input.mean, v.input.std) == ((0.0,) * 3, (255.0,) * 3)  # trained on 0..1 images
        assert v.output.stride == (16 if "v3_" in name else 4)


@pytest.fixture
def drive(test_data: Path) -> Iterator[DriveImitation]:
    imitation = DriveImitation().start()
    dm1, dm05 = (test_data / DM1_TPU).read_bytes(), (test_data / DM05_TPU).read_bytes()
    imitation.add(IDS["coral_deeplab_v3_dm1"], dm1, "form")
    imitation.add(IDS["coral_deeplab_v3_dm05"], dm05, "cookie")
    imitation.add(IDS["coral_deeplab_v3plus_dm1"], dm1, "quota")
    # coral_deeplab_v3plus_dm05's id is not registered: 404
    yield imitation
    imitation.stop()


@pytest.fixture
def stand_in_models(tmp_path: Path, test_data: Path, drive: DriveImitation, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A models dir whose ``original.toml`` overrides the four built-in entries with the
    stand-ins' md5s and ids; everything else (names, stride, normalisation, fallback) is the
    built-in entry's. The stand-ins are Google's compiled files, which end in Google's
    resize/argmax tail: strip_tail is set so their logits are what the check reads."""
    mdir = tmp_path / "models"
    mdir.mkdir()
    stand_in = {"coral_deeplab_v3_dm1": DM1_TPU, "coral_deeplab_v3_dm05": DM05_TPU,
                "coral_deeplab_v3plus_dm1": DM1_TPU, "coral_deeplab_v3plus_dm05": DM05_TPU}  # fmt: skip
    entries = builtin_entries()
    for name, entry in entries.items():
        data = (test_data / stand_in[name]).read_bytes()
        entry["files"]["edgetpu"].update(md5=hashlib.md5(data).hexdigest(), gdrive_id=IDS[name])
        entry["output"]["strip_tail"] = True
    (mdir / "original.toml").write_text(toml_dumps({"variants": entries}))
    monkeypatch.setenv("SEGD_GDRIVE_URL", drive.base_url)
    return mdir


def pull(mdir: Path, mirror: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segd", "models", "pull", *names, "--models-dir", str(mdir), "--mirror", str(mirror)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_pull_resolves_from_drive_pins_sha256_and_reports_the_files_that_never_arrive(
    stand_in_models: Path, test_data: Path, drive: DriveImitation
) -> None:
    mdir = stand_in_models
    proc = pull(mdir, test_data, *ORIGINAL)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    dm1 = (test_data / DM1_TPU).read_bytes()
    # md5 checked once, sha256 pinned; tensors read from the file (stride 16, 21 classes)
    assert f"publisher's md5 {hashlib.md5(dm1).hexdigest()} checked once, sha256 pinned {hashlib.sha256(dm1).hexdigest()[:12]}" in err
    assert "read from the file: input 513x513 uint8, logits 33x33x21 at stride 16" in err
    # the quota page and the dead link are named; the v3+ stand-ins never arrived
    assert "coral_deeplab_v3plus_dm1: deeplabv3plus_mnv2_dm1_voc_trainaug_os4_edgetpu.tflite NOT pulled" in err
    assert "quota exceeded" in err and "HTTP 404" in err
    assert "segd: not pulled: coral_deeplab_v3plus_dm1, coral_deeplab_v3plus_dm05" in err
    # the CPU fallbacks came from the mirror
    assert (mdir / "deeplabv3_mnv2_pascal_quant.tflite").is_file()
    pins = read_pins(mdir)
    assert pins == {
        "deeplabv3_mnv2_dm1_voc_tainaug_os16_edgetpu.tflite": hashlib.sha256(dm1).hexdigest(),
        "deeplabv3_mnv2_dm05_voc_tainaug_os16_edgetpu.tflite": hashlib.sha256((test_data / DM05_TPU).read_bytes()).hexdigest(),
    }
    assert not list(mdir.glob("*.partial"))  # failed downloads leave nothing behind
    # both interstitials were confirmed
    assert any(path == "/download" for path, _, _ in drive.requests)
    assert any(q.get("confirm", "").startswith("Tk3n_") for _, q, _ in drive.requests)


def test_after_the_first_verified_download_the_pin_rules_not_the_md5(stand_in_models: Path, test_data: Path) -> None:
    """A replaced file is refused even when the manifest's md5 matches it (md5 can be forged)."""
    mdir = stand_in_models
    variant = load_manifest(models_dir=mdir).get("coral_deeplab_v3_dm1")
    assert variant.edgetpu is not None
    path = resolve_file(variant.edgetpu, mdir, gdrive_url=os.environ["SEGD_GDRIVE_URL"])
    assert PIN_FILE in {p.name for p in mdir.iterdir()}
    other = (test_data / DM05_TPU).read_bytes()
    path.write_bytes(other)
    text = (mdir / "original.toml").read_text()
    (mdir / "original.toml").write_text(text.replace(variant.edgetpu.md5 or "", hashlib.md5(other).hexdigest()))
    forged = load_manifest(models_dir=mdir).get("coral_deeplab_v3_dm1").edgetpu
    assert forged is not None and forged.md5 == hashlib.md5(other).hexdigest()
    with pytest.raises(ChecksumMismatch, match="pinned"):
        resolve_file(forged, mdir, gdrive_url=os.environ["SEGD_GDRIVE_URL"])


def test_wrong_md5_download_is_refused_and_removed(stand_in_models: Path, drive: DriveImitation, test_data: Path) -> None:
    mdir = stand_in_models
    drive.add(IDS["coral_deeplab_v3_dm1"], (test_data / DM05_TPU).read_bytes(), "direct")  # not the file
    spec = load_manifest(models_dir=mdir).get("coral_deeplab_v3_dm1").edgetpu
    assert spec is not None
    with pytest.raises(ChecksumMismatch, match="publisher's md5"):
        resolve_file(spec, mdir, gdrive_url=os.environ["SEGD_GDRIVE_URL"])
    assert not list(mdir.glob("*.tflite*")) and not read_pins(mdir)


def test_tensors_are_checked_against_the_entry_stride(stand_in_models: Path, test_data: Path) -> None:
    """A v3+ entry expects logits at stride 4; a stride-16 file is refused by name."""
    mdir = stand_in_models
    text = (mdir / "original.toml").read_text()
    (mdir / "original.toml").write_text(text.replace(IDS["coral_deeplab_v3plus_dm1"], IDS["coral_deeplab_v3_dm1"]))
    variant = load_manifest(models_dir=mdir).get("coral_deeplab_v3plus_dm1")
    assert variant.edgetpu is not None
    path = resolve_file(variant.edgetpu, mdir, gdrive_url=os.environ["SEGD_GDRIVE_URL"])
    from segd.engine import settle

    with pytest.raises(ModelError, match="logits at stride 16, the manifest expects 4"):
        settle(variant, variant.edgetpu, path)


def test_without_a_tpu_the_declared_cpu_fallback_serves_and_says_so(stand_in_models: Path, test_data: Path) -> None:
    mdir = stand_in_models
    variant = load_manifest(models_dir=mdir).get("coral_deeplab_v3_dm05")
    seg = Segmenter.open(variant, models_dir=mdir, mirror=str(test_data), gdrive_url=os.environ["SEGD_GDRIVE_URL"])
    try:
        assert seg.backend == "cpu" and seg.variant.name == "deeplabv3_mnv2_dm05_pascal"
        assert seg.selection is not None
        assert "coral_deeplab_v3_dm05 is Edge TPU only, so its declared CPU fallback deeplabv3_mnv2_dm05_pascal serves" in seg.selection.reason
        mask = seg.segment((test_data / "bird.bmp").read_bytes()).mask
        assert mask.max() > 0
    finally:
        seg.close()


def test_with_a_tpu_a_file_that_never_arrives_is_the_reason_and_the_fallback_serves(
    stand_in_models: Path, test_data: Path, fake_edgetpu: Path, double_pairings: Path
) -> None:
    mdir = stand_in_models
    manifest = load_manifest(models_dir=mdir)
    runner, sel = open_runner(manifest.get("coral_deeplab_v3plus_dm1"), models_dir=mdir, mirror=str(test_data), gdrive_url=os.environ["SEGD_GDRIVE_URL"],
                              edgetpu_pairings=double_pairings)  # fmt: skip
    try:
        assert sel.backend == "cpu" and "quota exceeded" in sel.reason and "deeplabv3_mnv2_pascal serves" in sel.reason
    finally:
        runner.close()
    # The one that arrived was downloaded for the TPU (and pinned); the double cannot run a
    # compiled Coral file, which is the reason given, and its CPU fallback serves.
    runner, sel = open_runner(manifest.get("coral_deeplab_v3_dm1"), models_dir=mdir, mirror=str(test_data), gdrive_url=os.environ["SEGD_GDRIVE_URL"],
                              edgetpu_pairings=double_pairings)  # fmt: skip
    try:
        assert sel.backend == "cpu" and "edgetpu-custom-op" in sel.reason
        assert "deeplabv3_mnv2_dm1_voc_tainaug_os16_edgetpu.tflite" in read_pins(mdir)
    finally:
        runner.close()


# --- the daemon ------------------------------------------------------------------------------
TPU_ONLY_TOML = """
[variants.cdl_tpu_only]
description = "Edge-TPU-only stand-in: Google's DM0.5 CPU file as the 'compiled' file (the double runs it)"
labels = "pascal_voc"
cpu_fallback = "deeplabv3_mnv2_pascal"
[variants.cdl_tpu_only.input]
mean = [0.0, 0.0, 0.0]
std = [255.0, 255.0, 255.0]
[variants.cdl_tpu_only.output]
kind = "logits"
stride = 16
strip_tail = true
[variants.cdl_tpu_only.files.edgetpu]
name = "cdl_tpu_only_edgetpu.tflite"
md5 = "{md5}"
gdrive_id = "1StandInTpuOnlyFile00000"

[variants.cdl_never]
description = "Edge-TPU-only, its Drive link is dead"
labels = "pascal_voc"
cpu_fallback = "deeplabv3_mnv2_dm05_pascal"
[variants.cdl_never.input]
mean = 0.0
std = 255.0
[variants.cdl_never.output]
kind = "logits"
stride = 16
[variants.cdl_never.files.edgetpu]
name = "cdl_never_edgetpu.tflite"
md5 = "00000000000000000000000000000000"
gdrive_id = "1StandInNeverArrives0000"
"""


def test_daemon_serves_an_edge_tpu_only_variant_on_the_tpu_and_its_fallback_after_a_crash(
    tmp_path: Path, models_dir: Path, test_data: Path, drive: DriveImitation, edgetpu_double: Path
) -> None:
    import shutil

    import httpx
    from conftest import pairings_for
    from daemon import start_daemon

    mdir = tmp_path / "models"
    mdir.mkdir()
    for f in models_dir.iterdir():
        shutil.copy(f, mdir / f.name)
    stand_in = (test_data / "deeplabv3_mnv2_dm05_pascal_quant.tflite").read_bytes()
    drive.add("1StandInTpuOnlyFile00000", stand_in, "form")
    (mdir / "tpu_only.toml").write_text(TPU_ONLY_TOML.format(md5=hashlib.md5(stand_in).hexdigest()))
    env = {
        "SEGD_EDGETPU_LIBRARY": str(edgetpu_double), "FAKE_EDGETPU_DEVICES": "usb:/sys/bus/usb/devices/2-1",
        # 1 warm-up invoke + 2 good requests, then the delegate aborts the worker process
        "FAKE_EDGETPU_MODE": "crash_on_invoke", "FAKE_EDGETPU_CRASH_AFTER": "3",
        "SEGD_GDRIVE_URL": drive.base_url, "SEGD_WORKER_RESTART_BASE": "0.2",
        "SEGD_EDGETPU_PAIRINGS": str(pairings_for(edgetpu_double, tmp_path / "pairings.toml")),
    }  # fmt: skip
    d = start_daemon(tmp_path, mdir, "--model", "cdl_tpu_only", "--model", "cdl_never", env=env)
    try:
        info = httpx.get(d.url + "/models/cdl_tpu_only").json()
        assert info["backend"] == "edgetpu" and info["state"] == "ready", info
        assert info["input_size"] == [513, 513] and info["output"]["shape"] == [1, 33, 33, 21]  # read from the file
        assert info["selftest"]["passed"] and "different network" in info["selftest"]["note"]
        never = httpx.get(d.url + "/models/cdl_never").json()
        assert never["state"] == "ready" and never["backend"] == "cpu"
        assert "HTTP 404" in never["reason"] and "deeplabv3_mnv2_dm05_pascal serves" in never["reason"]
        data = (test_data / "bird.bmp").read_bytes()

        def post(model: str) -> httpx.Response:
            return httpx.post(f"{d.url}/segment?model={model}", content=data, headers={"content-type": "image/bmp"}, timeout=60)

        first = [post("cdl_tpu_only") for _ in range(2)]
        assert [r.headers["x-segd-backend"] for r in first] == ["edgetpu", "edgetpu"]
        crashed = post("cdl_tpu_only")  # served by the CPU fallback: Google's DM1, prepared for it
        assert crashed.status_code == 200 and crashed.headers["x-segd-backend"] == "cpu"
        fallback = Segmenter.open(load_manifest(models_dir=mdir).get("deeplabv3_mnv2_pascal"), models_dir=mdir, accelerator="cpu")
        from conftest import read_mask_png

        assert (read_mask_png(crashed.content) == fallback.segment(data).mask).all()
        assert post("cdl_never").status_code == 200
        assert d.proc.poll() is None
        assert read_pins(mdir) == {"cdl_tpu_only_edgetpu.tflite": hashlib.sha256(stand_in).hexdigest()}
    finally:
        d.stop()


def test_bench_original_prints_a_row_per_artifact_next_to_the_published_figures(models_dir: Path, tmp_path: Path) -> None:
    """Without a TPU and with --accelerator edgetpu nothing may silently run on a fallback: each
    artifact's row says why it was not measured; the published figures are beside them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGD_")}
    env.update(SEGD_MODELS_DIR=str(models_dir), SEGD_EDGETPU_LIBRARY="/nonexistent/libedgetpu.so.1")
    r = subprocess.run([sys.executable, "-m", "segd", "bench", "--original", "--accelerator", "edgetpu",
                        "--iterations", "1", "--warmup", "0"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line}  # fmt: skip
    assert set(ORIGINAL) | {"deeplabv3_mnv2_pascal"} <= set(rows)
    assert rows["coral_deeplab_v3_dm1"][5:] == ["43.7", "143.0"]
    assert rows["coral_deeplab_v3_dm05"][5:] == ["32.6", "129.4"]
    assert rows["deeplabv3_mnv2_pascal"][5:] == ["147.5", "368.6"]
    assert rows["coral_deeplab_v3plus_dm1"][3] == "-"
    assert "coral_deeplab_v3_dm1: not measured: libedgetpu not installed" in r.stdout


def test_doctor_says_where_an_edge_tpu_only_variant_comes_from_and_what_serves_it(models_dir: Path, stand_in_models: Path, test_data: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGD_", "FAKE_EDGETPU_"))}
    env.update(SEGD_MODELS_DIR=str(stand_in_models), SEGD_MODELS="coral_deeplab_v3_dm05", SEGD_ACCELERATOR="edgetpu",
               SEGD_EDGETPU_LIBRARY="/nonexistent/libedgetpu.so.1")  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "segd", "doctor"], env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert "coral_deeplab_v3_dm05: deeplabv3_mnv2_dm05_pascal_quant.tflite is not in" in out  # its CPU fallback
    assert f"deeplabv3_mnv2_dm05_voc_tainaug_os16_edgetpu.tflite is not in {stand_in_models}" in out
    assert f"Google Drive (file {IDS['coral_deeplab_v3_dm05']})" in out
    # once pulled (md5 checked, sha256 pinned), doctor holds the file to its pin
    assert pull(stand_in_models, test_data, "coral_deeplab_v3_dm05").returncode == 0
    r = subprocess.run([sys.executable, "-m", "segd", "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert "deeplabv3_mnv2_dm05_voc_tainaug_os16_edgetpu.tflite present" in r.stdout and "(its pin, or the publisher's md5)" in r.stdout
