"""Shared fixtures. Test data (Coral's public models and images) is read from
``SEGD_TEST_DATA`` (default ``<repo>/../shared/coral-test-data``) and never copied into the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_data_dir() -> Path:
    return Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))


@pytest.fixture(scope="session")
def test_data() -> Path:
    path = test_data_dir()
    if not (path / "deeplabv3_mnv2_pascal_quant.tflite").is_file():
        pytest.fail(f"Coral test data not found in {path}; set SEGD_TEST_DATA")
    return path


@pytest.fixture(scope="session")
def models_dir(test_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory filled from the test data the way a user's is: through the mirror
    path of ``segd.variants.resolve_file`` (copy + sha256 check + atomic rename)."""
    from segd.variants import load_manifest, resolve_file

    mdir = tmp_path_factory.mktemp("models")
    for variant in load_manifest(models_dir=mdir).variants.values():
        for spec in variant.files():
            if spec.gdrive_id:
                continue  # the original coral-deeplab's Drive files: unreachable here
            resolve_file(spec, mdir, mirror=str(test_data), download=False)
    return mdir


@pytest.fixture(scope="session")
def manifest(models_dir: Path):  # type: ignore[no-untyped-def]
    from segd.variants import load_manifest

    return load_manifest(models_dir=models_dir)


@pytest.fixture(scope="session")
def engine(manifest, models_dir: Path):  # type: ignore[no-untyped-def]
    """Google's DM0.5 model on the CPU, in this process: what the daemons the HTTP tests start
    (``--model deeplabv3_mnv2_dm05_pascal --accelerator cpu``) must answer."""
    from segd.engine import Segmenter

    return Segmenter.open(manifest.get("deeplabv3_mnv2_dm05_pascal"), models_dir=models_dir, accelerator="cpu")


def read_rgb(path: Path):  # type: ignore[no-untyped-def]
    import cv2

    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def pixel_iou(a, b) -> float:  # type: ignore[no-untyped-def]
    """Coral's test metric: same / (2N - same)."""
    same = int((a == b).sum())
    return same / (2 * a.size - same)


def read_mask_png(data: bytes):  # type: ignore[no-untyped-def]
    """Class ids of an indexed mask PNG (Pillow keeps palette indices; OpenCV expands colours)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "P", im.mode
        return np.asarray(im).copy()


# --- Edge TPU test double (tests/edgetpu_double) ---------------------------------------------
FAKE_EDGETPU_VARS = (
    "FAKE_EDGETPU_DEVICES",
    "FAKE_EDGETPU_DEVICES_FILE",
    "FAKE_EDGETPU_MODE",
    "FAKE_EDGETPU_VERSION",
    "FAKE_EDGETPU_ERROR",
    "FAKE_EDGETPU_CRASH_AFTER",
    "FAKE_EDGETPU_MARKER",
)


@pytest.fixture(autouse=True)
def no_edgetpu_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts on a machine without libedgetpu, unless it asks for the double
    (``fake_edgetpu``) or sets the library itself. Needed because the dynamic loader resolves a
    bare ``libedgetpu.so.1`` to any library of that soname already loaded in the process — the
    double, once an earlier test in this pytest process has loaded it."""
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", "/nonexistent/libedgetpu.so.1")


@pytest.fixture(scope="session")
def edgetpu_double(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake libedgetpu (tests/edgetpu_double/fake_edgetpu.c) built with gcc as
    ``<tmp>/libedgetpu.so.1``: a real shared library the real runtimes load as a delegate."""
    from edgetpu_double.build import build_double, compiler

    if compiler() is None:
        pytest.skip("no C compiler (gcc) installed: cannot build the Edge TPU test double")
    return build_double(tmp_path_factory.mktemp("edgetpu_double"))


def pairings_for(library: Path, out: Path, runtime: str = "*", versions: str = "*") -> Path:
    """A pairings table (format of segd/data/edgetpu_pairings.toml) that recognises ``library``
    by its sha256 and calls it good inside ``runtime`` ``versions`` — what a user who built their
    own libedgetpu writes to SEGD_EDGETPU_PAIRINGS."""
    import hashlib

    sha = hashlib.sha256(library.read_bytes()).hexdigest()
    out.write_text(
        f'[[build]]\nid = "test-double-{sha[:8]}"\nname = "the Edge TPU test double {library}"\n'
        f'sha256 = ["{sha}"]\n[[build.pairing]]\nruntime = "{runtime}"\nversions = "{versions}"\n'
        'verdict = "good"\nnote = "tests/edgetpu_double implements the C delegate ABI every runtime shares"\n'
        'sources = ["tests/edgetpu_double/fake_edgetpu.c"]\n'
    )
    return out


@pytest.fixture(scope="session")
def double_pairings(edgetpu_double: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pairings_for`` the default double, good inside every runtime."""
    return pairings_for(edgetpu_double, tmp_path_factory.mktemp("pairings") / "double.toml")


@pytest.fixture
def fake_edgetpu(edgetpu_double: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point segd at the double (SEGD_EDGETPU_LIBRARY) with one USB Edge TPU attached and the
    double in its default, libedgetpu-like mode. Tests change FAKE_EDGETPU_* with
    monkeypatch.setenv: that configures the real library (it reads them at call time, and a
    worker child inherits them)."""
    for name in FAKE_EDGETPU_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", str(edgetpu_double))
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "usb:/sys/bus/usb/devices/2-1")
    return edgetpu_double


@pytest.fixture
def gated_mirror(test_data: Path):  # type: ignore[no-untyped-def]
    """An HTTP mirror of the test data on 127.0.0.1 that holds every download until the test
    sets the gate: model loading is exactly as slow as a test wants. Yields (url, gate)."""
    import http.server
    import threading

    gate = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            gate.wait(60)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(test_data)))
    server.handle_error = lambda *a: None  # type: ignore[method-assign]  # a daemon that hung up: expected
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", gate
    gate.set()
    server.shutdown()
