"""Manifest and model-file resolution: models dir -> mirror (dir or URL) -> manifest URL,
checksum-verified, atomic, resumable."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from segd.errors import ChecksumMismatch, ModelNotFound, UnknownModel
from segd.variants import FileSpec, load_manifest, resolve_file, sha256_file

DM05_CPU = "deeplabv3_mnv2_dm05_pascal_quant.tflite"


def spec_of(name: str) -> FileSpec:
    for variant in load_manifest(models_dir=Path("/nonexistent")).variants.values():
        for spec in variant.files():
            if spec.name == name:
                return spec
    raise KeyError(name)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support, request log and an optional cut-off."""

    requests: ClassVar[list[tuple[str, str | None]]] = []
    cut_after: int | None = None  # send only this many bytes of a full response, then hang up
    stall_after: int | None = None  # send this many bytes, then stall until released
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        m = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.stall_after is not None and not m:
            self.wfile.write(body[: self.stall_after])
            self.wfile.flush()
            self.release.wait(30)
            return
        if self.cut_after is not None and not m:
            self.wfile.write(body[: self.cut_after])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)


@pytest.fixture
def http_mirror(test_data: Path) -> Iterator[tuple[str, type[RangeHandler]]]:
    handler = type("H", (RangeHandler,), {"requests": [], "cut_after": None, "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(test_data)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    handler.release.set()
    server.shutdown()


def test_manifest_lists_the_coral_models_with_labels_and_geometry() -> None:
    manifest = load_manifest(models_dir=Path("/nonexistent"))
    assert manifest.default == "deeplabv3_mnv2_pascal"
    assert set(manifest.variants) >= {"deeplabv3_mnv2_pascal", "deeplabv3_mnv2_dm05_pascal", "deeplab_edgetpu_slim_cityscapes"}
    city = manifest.get("deeplab_edgetpu_slim_cityscapes")
    assert city.n_classes == 19 and city.labels.names[0] == "road"
    assert city.output.align_corners and city.output.strip_tail and city.output.stride == 16
    with pytest.raises(UnknownModel, match=r"known models: .*deeplabv3_mnv2_pascal"):
        manifest.get("nope")


def test_manifest_checksums_match_the_coral_test_data(test_data: Path) -> None:
    for variant in load_manifest(models_dir=Path("/nonexistent")).variants.values():
        for spec in variant.files():
            if spec.gdrive_id:
                continue  # the original coral-deeplab's Drive files (md5 only): not in the test data
            assert sha256_file(test_data / spec.name) == spec.sha256, spec.name
            assert (test_data / spec.name).stat().st_size == spec.size


def test_user_manifests_in_the_models_dir_add_variants(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(
        '[variants.mine]\nlabels = { names = ["bg", "thing"], palette = "voc" }\n'
        '[variants.mine.input]\nshape = [1, 257, 257, 3]\ndtype = "uint8"\n'
        '[variants.mine.output]\nkind = "logits"\nshape = [1, 17, 17, 2]\ndtype = "int8"\n'
        '[variants.mine.files.cpu]\nname = "mine.tflite"\nsha256 = "' + "0" * 64 + '"\n'
    )
    v = load_manifest(models_dir=tmp_path).get("mine")
    assert v.labels.names == ("bg", "thing") and v.input.hw == (257, 257) and v.edgetpu is None
    (tmp_path / "broken.toml").write_text('[variants.bad]\nlabels = "pascal_voc"\n')
    manifest = load_manifest(models_dir=tmp_path)  # a broken user manifest is skipped, not fatal
    assert "mine" in manifest.variants and "bad" not in manifest.variants
    assert any("broken.toml: variants.bad: missing key 'input'" in p for p in manifest.problems)
    with pytest.raises(UnknownModel, match=r"skipped: .*broken\.toml"):
        manifest.get("bad")


def test_file_in_the_models_dir_is_used_when_its_checksum_matches(tmp_path: Path, test_data: Path) -> None:
    shutil.copy(test_data / DM05_CPU, tmp_path / DM05_CPU)
    assert resolve_file(spec_of(DM05_CPU), tmp_path, mirror=None, download=False) == tmp_path / DM05_CPU


def test_mirror_directory_is_copied_verified_and_renamed_into_place(tmp_path: Path, test_data: Path) -> None:
    path = resolve_file(spec_of(DM05_CPU), tmp_path, mirror=str(test_data), download=False)
    assert path == tmp_path / DM05_CPU and sha256_file(path) == spec_of(DM05_CPU).sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == [DM05_CPU]


def test_corrupt_mirror_copy_is_refused_and_nothing_is_left_behind(tmp_path: Path, test_data: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = bytearray((test_data / DM05_CPU).read_bytes())
    data[1000] ^= 1
    (mirror / DM05_CPU).write_bytes(bytes(data))
    models = tmp_path / "models"
    with pytest.raises(ChecksumMismatch, match="sha256"):
        resolve_file(spec_of(DM05_CPU), models, mirror=str(mirror), download=False)
    assert list(models.iterdir()) == []


def test_missing_file_with_no_source_names_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=DM05_CPU):
        resolve_file(spec_of(DM05_CPU), tmp_path, mirror=None, download=False)


def test_replaced_file_in_the_models_dir_is_refused_not_silently_refetched(tmp_path: Path, test_data: Path) -> None:
    (tmp_path / DM05_CPU).write_bytes((test_data / "deeplabv3_mnv2_pascal_quant.tflite").read_bytes())
    with pytest.raises(ChecksumMismatch, match="segd models pull --force"):
        resolve_file(spec_of(DM05_CPU), tmp_path, mirror=str(test_data))
    path = resolve_file(spec_of(DM05_CPU), tmp_path, mirror=str(test_data), force=True)
    assert sha256_file(path) == spec_of(DM05_CPU).sha256


def test_download_over_http_resumes_a_partial_file_with_a_range_request(
    tmp_path: Path, test_data: Path, http_mirror: tuple[str, type[RangeHandler]]
) -> None:
    url, handler = http_mirror
    handler.cut_after = 300_000  # the first attempt dies part-way
    spec = spec_of(DM05_CPU)
    with pytest.raises(ModelNotFound):
        resolve_file(spec, tmp_path, mirror=url, download=False)
    partial = tmp_path / (DM05_CPU + ".partial")
    assert partial.stat().st_size == 300_000
    assert not (tmp_path / DM05_CPU).exists()
    handler.cut_after = None
    path = resolve_file(spec, tmp_path, mirror=url, download=False)
    assert sha256_file(path) == spec.sha256
    assert handler.requests[-1] == (f"/{DM05_CPU}", "bytes=300000-")
    assert not partial.exists()


def test_killed_pull_leaves_no_partial_or_corrupt_file_in_place(
    tmp_path: Path, test_data: Path, http_mirror: tuple[str, type[RangeHandler]]
) -> None:
    url, handler = http_mirror
    handler.stall_after = 100_000
    models = tmp_path / "models"
    env = {**os.environ, "SEGD_MODELS_DIR": str(models)}
    proc = subprocess.Popen([sys.executable, "-m", "segd", "models", "pull", "deeplabv3_mnv2_pascal",
                             "--cpu-only", "--mirror", url], env=env, stderr=subprocess.PIPE)  # fmt: skip
    partial = models / "deeplabv3_mnv2_pascal_quant.tflite.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size >= 100_000):  # mid-transfer
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (models / "deeplabv3_mnv2_pascal_quant.tflite").exists()
    handler.stall_after = None
    r = subprocess.run([sys.executable, "-m", "segd", "models", "pull", "deeplabv3_mnv2_pascal", "--cpu-only",
                        "--mirror", url], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sha256_file(models / "deeplabv3_mnv2_pascal_quant.tflite") == spec_of("deeplabv3_mnv2_pascal_quant.tflite").sha256
    assert [p.name for p in models.iterdir()] == ["deeplabv3_mnv2_pascal_quant.tflite"]
    assert handler.requests[-1] == ("/deeplabv3_mnv2_pascal_quant.tflite", "bytes=100000-")  # resumed


def test_pull_into_a_full_disk_fails_cleanly(tmp_path: Path, test_data: Path) -> None:
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: the copy fails part-way."""
    models = tmp_path / "models"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))\n"
        "from segd.cli import main\n"
        f"sys.exit(main(['models', 'pull', 'deeplabv3_mnv2_pascal', '--cpu-only', '--mirror', {str(test_data)!r},"
        f" '--models-dir', {str(models)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "could not fetch deeplabv3_mnv2_pascal_quant.tflite" in r.stderr
    assert "File too large" in r.stderr
    assert not (models / "deeplabv3_mnv2_pascal_quant.tflite").exists()


def test_every_builtin_variant_round_trips_through_dump_and_load(tmp_path: Path) -> None:
    from segd.manifest import builtin_manifest, dump_variant, load_manifest, variant_table

    for variant in load_manifest(models_dir=tmp_path / "none").variants.values():
        path = tmp_path / f"{variant.name}.toml"
        path.write_text(dump_variant(variant))
        # loaded after the built-in manifest, where an Edge-TPU-only variant's cpu_fallback is
        again = load_manifest(paths=[builtin_manifest(), path]).get(variant.name)
        assert again.source == path
        assert variant_table(again) == variant_table(variant)
        assert again.labels.palette.tolist() == variant.labels.palette.tolist()
