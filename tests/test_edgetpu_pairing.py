"""The libedgetpu/TFLite pairing (segd/data/edgetpu_pairings.toml, segd/runtime/pairing.py) and
the Edge TPU worker running under a SECOND Python environment.

The second virtualenv (tests/tpu_venv.py) has numpy<2 and tflite-runtime 2.14.0 from PyPI; the
daemon's has ai-edge-litert and numpy 2. The worker program (segd/runtime/tpu_worker.py) runs
there and loads the C test double (tests/edgetpu_double) through tflite_runtime's real
load_delegate. A double built with the stock libedgetpu 16.0 version string is a known-bad
pairing inside tflite_runtime 2.14: its FAKE_EDGETPU_MARKER file proves load_delegate was never
reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import pairings_for, read_mask_png
from daemon import Daemon, start_daemon
from test_edgetpu_serving import segment, tpu_models, wait_for  # noqa: F401  (tpu_models: fixture)
from tpu_venv import tpu_python

from segd.engine import Segmenter, open_runner
from segd.errors import RuntimeUnavailable, WorkerCrashed
from segd.runtime import pairing
from segd.runtime.cpu import open_cpu
from segd.runtime.worker import SHM_PREFIX, edgetpu_worker_factory
from segd.variants import load_manifest

CPU_MODEL = "deeplabv3_mnv2_dm05_pascal_quant.tflite"
USB = "usb:/sys/bus/usb/devices/2-1"
# Real edgetpu_version() strings, from public reports (sources in segd/data/edgetpu_pairings.toml)
STOCK_16 = "BuildLabel(COMPILER=6.3.0 20170516,DATE=redacted,TIME=redacted), RuntimeVersion(14)"
LEGACY_13 = "BuildLabel(COMPILER=5.4.0 20160609,DATE=redacted,TIME=redacted,CL_NUMBER=291256449), RuntimeVersion(13)"
SOURCE_BUILT = "BuildLabel(COMPILER=14.2.0,DATE=Feb 22 2026,TIME=09:51:57), RuntimeVersion(14)"
# tflite_runtime 2.14 runs this model slowly on a busy 2-core machine: generous call timeouts
FAST = {"backoff_base": 0.2, "backoff_max": 2.0, "start_timeout": 60.0, "call_timeout": 60.0}


@pytest.fixture(scope="session")
def second_python() -> Path:
    return tpu_python()


@pytest.fixture(scope="session")
def stock_double(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The double built to report the stock libedgetpu 16.0's version string."""
    from edgetpu_double.build import build_double, compiler

    if compiler() is None:
        pytest.skip("no C compiler (gcc) installed")
    return build_double(tmp_path_factory.mktemp("stock_double"), version=STOCK_16)


@pytest.fixture
def tpu(edgetpu_double: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """The default double on one USB device, a marker file, and a table calling the double good
    inside tflite_runtime 2.14.0 only (so the worker must pick that runtime)."""
    for name in [n for n in os.environ if n.startswith("FAKE_EDGETPU_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", str(edgetpu_double))
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", USB)
    marker = tmp_path / "delegate-created"
    monkeypatch.setenv("FAKE_EDGETPU_MARKER", str(marker))
    table = pairings_for(edgetpu_double, tmp_path / "pairings.toml", "tflite_runtime", "2.14.0")
    yield {"double": edgetpu_double, "marker": marker, "pairings": table}
    assert {n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}{os.getpid()}_")} == set()


@pytest.fixture(scope="module")
def model(test_data: Path) -> bytes:
    return (test_data / CPU_MODEL).read_bytes()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (513, 513, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def cpu_outputs(model: bytes, images: list[np.ndarray]) -> list[np.ndarray]:
    runner = open_cpu(model)  # the daemon's own runtime: ai-edge-litert, numpy 2
    try:
        return [runner.run(x) for x in images]
    finally:
        runner.close()


# --- the table, on real version strings ------------------------------------------------------------
TABLE = pairing.Table.load()
INSTALLED = {"litert": "2.3.0", "tflite_runtime": "2.14.0"}


def lib(package: str | None = None, version: str | None = None, string: str | None = None,
        path: str = "/usr/lib/aarch64-linux-gnu/libedgetpu.so.1.0") -> pairing.Library:  # fmt: skip
    return pairing.Library("libedgetpu.so.1", path, package, version, string)


@pytest.mark.parametrize(
    ("library", "runtimes", "build", "runtime", "verdicts"),
    [
        # stock 16.0 (Coral apt, 2021): segfaults inside TFLite > 2.11 (google-coral/edgetpu#812)
        (lib("libedgetpu1-std", "16.0", STOCK_16), INSTALLED, "coral-16.0", None, ["bad", "bad"]),
        (lib(string=STOCK_16), {"tflite_runtime": "2.11.1"}, "coral-16.0", "tflite_runtime", ["good"]),
        (lib(string=STOCK_16), {"tflite_runtime": "2.5.0.post1"}, "coral-16.0", "tflite_runtime", ["good"]),
        (lib(string=STOCK_16), {"tflite_runtime": "2.12.0"}, "coral-16.0", None, ["bad"]),
        # legacy RuntimeVersion 13 builds: refused inside anything
        (lib("libedgetpu1-legacy-std", "15.0", LEGACY_13), INSTALLED, "coral-runtime-13", None, ["bad", "bad"]),
        (lib(string="BuildLabel(COMPILER=6.3.0 20170516,DATE=redacted,TIME=redacted,CL_NUMBER=317268237), RuntimeVersion(13)"),
         {"tflite_runtime": "2.5.0"}, "coral-runtime-13", None, ["bad"]),
        # community 16.0tfX.Y.Z: good with tflite_runtime of the same TF version
        (lib("libedgetpu1-max", "16.0tf2.17.1-1", SOURCE_BUILT), {"tflite_runtime": "2.17.1", "litert": "2.3.0"},
         "feranick-16.0tf2.17.1", "tflite_runtime", ["good", "unknown"]),
        (lib("libedgetpu1-std", "16.0tf2.17.1-1.bookworm"), {"tflite_runtime": "2.17.1"}, "feranick-16.0tf2.17.1", "tflite_runtime", ["good"]),
        (lib("libedgetpu1-max", "16.0tf2.17.0-1"), {"tflite_runtime": "2.17.1"}, "feranick-16.0tf2.17.0", None, ["unknown"]),
        (lib("libedgetpu1-std", "16.0tf2.13.1-2"), {"tflite_runtime": "2.14.1"}, "feranick-16.0tf2.13.1", "tflite_runtime", ["good"]),
        (lib("libedgetpu1-std", "16.0tf2.13.1-2"), {"tflite_runtime": "2.14.0"}, "feranick-16.0tf2.13.1", None, ["unknown"]),
        (lib("libedgetpu1-max", "16.0tf2.19.1-1"), {"tflite_runtime": "2.19.1"}, "feranick-16.0tf2.19.1", "tflite_runtime", ["good"]),
        (lib("libedgetpu1-max", "16.0tf2.17.1-1"), {"litert": "2.3.0"}, "feranick-16.0tf2.17.1", None, ["unknown"]),
        # nixpkgs' build inside ai-edge-litert (Frigate on nixpkgs)
        (lib(path="/nix/store/" + "a" * 32 + "-libedgetpu-0-unstable-2024-03-14/lib/libedgetpu.so.1.0"),
         {"litert": "2.3.0"}, "nixpkgs-libedgetpu-2024-03-14", "litert", ["good"]),
        # a build nobody reported on: refused
        (lib(string=SOURCE_BUILT), INSTALLED, None, None, ["unknown", "unknown"]),
    ],
)
def test_pairing_decisions_on_real_version_strings(
    library: pairing.Library, runtimes: dict[str, str], build: str | None, runtime: str | None, verdicts: list[str]
) -> None:
    decision = pairing.decide(library, runtimes, table=TABLE, machine="aarch64")
    assert (decision.build.id if decision.build else None) == build
    assert decision.runtime == runtime
    assert [v.verdict for v in decision.verdicts] == verdicts
    if runtime is None:
        rec = TABLE.recommended
        assert "refused to load" in decision.message
        assert f"{rec.package} {rec.package_version}" in decision.message
        assert "tflite_runtime-2.17.1-cp311-cp311-linux_aarch64.whl" in decision.message
    else:
        assert decision.known_good and "known good" in decision.message


def test_tflite_runtime_is_preferred_and_trust_loads_what_the_table_refuses() -> None:
    both = {"litert": "2.3.0", "tflite_runtime": "2.5.0"}
    assert pairing.decide(lib(string=STOCK_16), both, table=TABLE).runtime == "tflite_runtime"
    trusted = pairing.decide(lib(string=STOCK_16), INSTALLED, table=TABLE, policy="trust", preferred="litert")
    assert trusted.runtime == "litert" and not trusted.known_good and "trust" in trusted.message
    with pytest.raises(ValueError, match="edgetpu_pairing"):
        pairing.decide(lib(string=STOCK_16), INSTALLED, table=TABLE, policy="yolo")
    none = pairing.decide(lib(string=STOCK_16), {"litert": None, "tflite_runtime": None}, table=TABLE)
    assert none.runtime is None and "no TFLite runtime" in none.message


def test_every_claim_names_a_public_source_and_the_recommended_pair_is_known_good() -> None:
    for build in TABLE.builds:
        for claim in build.claims:
            assert claim.sources and all(s.startswith("https://") for s in claim.sources), build.id
    rec = TABLE.recommended
    decision = pairing.decide(lib(rec.package, rec.package_version), {rec.runtime: rec.runtime_version}, table=TABLE)
    assert decision.runtime == rec.runtime and decision.known_good
    assert (rec.deb("aarch64") or "").endswith("_arm64.deb") and rec.deb("armv7l") is None
    assert pairing.install_commands(rec, "armv7l") == [] and "64-bit" in pairing.install_advice(rec, "armv7l")


def test_versions_compare_numerically() -> None:
    assert pairing.version_matches("2.5.0.post1", ">=2.5.0,<2.12")
    assert not pairing.version_matches("2.12.0", ">=2.5.0,<2.12")
    assert pairing.version_matches("2.11.1", "<2.12") and pairing.version_matches("2.17.1", "2.17.1")
    assert not pairing.version_matches("2.17.10", "2.17.1") and pairing.version_matches("x", "*")


def test_dpkg_database_names_the_package_that_owns_the_loaded_file(tmp_path: Path) -> None:
    libdir = tmp_path / "usr" / "lib"
    libdir.mkdir(parents=True)
    real = libdir / "libedgetpu.so.1.0"
    real.write_bytes(b"\x7fELF")
    (libdir / "libedgetpu.so.1").symlink_to(real.name)
    admin = tmp_path / "dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "status").write_text(
        "Package: libedgetpu1-std\nStatus: deinstall ok config-files\nVersion: 16.0\n\n"
        "Package: libedgetpu1-max\nStatus: install ok installed\nArchitecture: arm64\n"
        "Version: 16.0tf2.17.1-1.bookworm\n"
    )
    (admin / "info" / "libedgetpu1-max:arm64.list").write_text(f"/.\n{libdir}\n{real}\n{libdir / 'libedgetpu.so.1'}\n")
    seen = pairing.observe("libedgetpu.so.1", str(real), None, admindir=admin, table=TABLE)
    assert (seen.package, seen.package_version) == ("libedgetpu1-max", "16.0tf2.17.1-1.bookworm")
    assert seen.sha256 == __import__("hashlib").sha256(b"\x7fELF").hexdigest()
    decision = pairing.decide(seen, {"tflite_runtime": "2.17.1"}, table=TABLE)
    assert decision.runtime == "tflite_runtime" and "Debian package libedgetpu1-max" in decision.recognised_by


# --- the worker under the second Python ------------------------------------------------------------
def test_worker_under_a_second_python_uses_its_tflite_runtime_and_matches_the_cpu(
    tpu: dict[str, Path], second_python: Path, model: bytes, images: list[np.ndarray],
    cpu_outputs: list[np.ndarray],
) -> None:
    make = edgetpu_worker_factory(python=str(second_python), pairings=tpu["pairings"], **FAST)
    with make(model, "usb:0") as worker:
        info = worker.describe()
        assert info["runtime"] == "tflite-runtime 2.14.0" and info["backend"] == "edgetpu"
        assert info["python"]["executable"] == str(second_python) and info["python"]["numpy"].startswith("1.")
        assert np.__version__.startswith("2.")  # the daemon's side
        assert info["pairing"]["runtime"] == "tflite_runtime" and info["pairing"]["known_good"]
        for x, want in zip(images, cpu_outputs, strict=True):
            np.testing.assert_array_equal(worker.run(x), want)
    assert tpu["marker"].read_text().count("tflite_plugin_create_delegate") == 1


def test_worker_under_a_second_python_crash_restart_and_hang(
    tpu: dict[str, Path], second_python: Path, model: bytes, images: list[np.ndarray],
    cpu_outputs: list[np.ndarray], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "crash_on_invoke")
    monkeypatch.setenv("FAKE_EDGETPU_CRASH_AFTER", "1")
    make = edgetpu_worker_factory(python=str(second_python), pairings=tpu["pairings"], **FAST)
    with make(model, None) as worker:
        first = worker.pid
        np.testing.assert_array_equal(worker.run(images[0]), cpu_outputs[0])
        with pytest.raises(WorkerCrashed, match="SIGABRT"):
            worker.run(images[1])
        deadline = time.monotonic() + 30
        while worker.describe()["state"] != "ready":
            assert time.monotonic() < deadline, worker.describe()
            time.sleep(0.05)
        assert worker.pid != first and worker.restarts == 1
        np.testing.assert_array_equal(worker.run(images[2]), cpu_outputs[2])  # the new child serves
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "hang_on_invoke")
    hang = edgetpu_worker_factory(python=str(second_python), pairings=tpu["pairings"], **FAST)
    with hang(model, None) as worker:
        worker.run(images[0])  # tflite_runtime 2.14 is slow on the CPU: time it with the default
        worker.call_timeout = 1.0
        t = time.monotonic()
        with pytest.raises(Exception, match="did not answer within 1 s"):
            worker.run(images[1])
        assert time.monotonic() - t < 5


def test_known_bad_pairing_never_reaches_load_delegate(
    tpu: dict[str, Path], stock_double: Path, second_python: Path, model: bytes,
    monkeypatch: pytest.MonkeyPatch, tpu_models: Path,  # noqa: F811
) -> None:
    # stock libedgetpu 16.0 (by its version string) inside tflite_runtime 2.14.0: known bad
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", str(stock_double))
    make = edgetpu_worker_factory(python=str(second_python), **FAST)
    with pytest.raises(RuntimeUnavailable) as refused:
        make(model, None)
    text = refused.value.detail
    assert "refused to load libedgetpu 16.0 from the Coral apt repository" in text
    assert "tflite-runtime 2.14.0: known bad" in text and "edgetpu/issues/812" in text
    assert "libedgetpu1-max 16.0tf2.17.1-1" in text and 'edgetpu_pairing = "trust"' in text
    # in process too (the daemon's own ai-edge-litert)
    variant = load_manifest(models_dir=tpu_models).get("tpu_dm05")
    with pytest.raises(RuntimeUnavailable, match=r"ai-edge-litert 2\.3\.0: known bad"):
        open_runner(variant, models_dir=tpu_models, accelerator="edgetpu")
    assert not tpu["marker"].exists()  # the delegate was never created
    # trust: the same pair is loaded (the marker proves the check above could have failed)
    with edgetpu_worker_factory(python=str(second_python), pairing="trust", **FAST)(model, None) as worker:
        assert worker.describe()["pairing"]["known_good"] is False
    assert tpu["marker"].read_text().count("tflite_plugin_create_delegate") == 1


def test_an_edgetpu_python_that_does_not_run_is_a_clear_start_up_error(tpu: dict[str, Path], model: bytes) -> None:
    make = edgetpu_worker_factory(python="/nonexistent/bin/python", pairings=tpu["pairings"], **FAST)
    with pytest.raises(RuntimeUnavailable, match="cannot start the Edge TPU worker with /nonexistent/bin/python"):
        make(model, None)
    assert not tpu["marker"].exists()


# --- the daemon, its TPU worker under the second Python --------------------------------------------
@pytest.fixture
def second_python_daemon(tmp_path: Path, tpu_models: Path, edgetpu_double: Path, second_python: Path) -> Iterator[object]:  # noqa: F811
    started: list[Daemon] = []

    def start(double: Path = edgetpu_double, pairings: bool = True, **fake: str) -> Daemon:
        env = {"SEGD_EDGETPU_LIBRARY": str(double), "FAKE_EDGETPU_DEVICES": USB,
               "SEGD_EDGETPU_PYTHON": str(second_python), "SEGD_WORKER_RESTART_BASE": "0.2", "SEGD_TPU_TIMEOUT": "60",
               "FAKE_EDGETPU_MARKER": str(tmp_path / "marker")}  # fmt: skip
        if pairings:
            env["SEGD_EDGETPU_PAIRINGS"] = str(pairings_for(double, tmp_path / "p.toml", "tflite_runtime", "2.14.0"))
        env.update({f"FAKE_EDGETPU_{k.upper()}": v for k, v in fake.items()})
        d = start_daemon(tmp_path, tpu_models, "--model", "tpu_dm05", env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


RUN_CPU = """
import sys, numpy as np
from tflite_runtime.interpreter import Interpreter
interp = Interpreter(model_path=sys.argv[1], num_threads=1)
interp.allocate_tensors()
interp.set_tensor(interp.get_input_details()[0]["index"], np.load(sys.argv[2])[None])
interp.invoke()
np.save(sys.argv[3], interp.get_tensor(interp.get_output_details()[0]["index"])[0])
"""


def tflite_runtime_mask(python: Path, seg: Segmenter, data: bytes) -> np.ndarray:
    """segd's decode/prepare/finish around the model run by tflite_runtime on the CPU in ``python``."""
    import tempfile

    from segd.engine import model_bytes

    assert seg.selection is not None
    model = model_bytes(seg.variant, seg.selection.file, seg.selection.path)  # tail stripped as served
    prepared = seg.prepare(seg.decode(data))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.tflite").write_bytes(model)
        np.save(Path(tmp) / "x.npy", prepared.tensor)
        subprocess.run([str(python), "-I", "-c", RUN_CPU, f"{tmp}/m.tflite", f"{tmp}/x.npy", f"{tmp}/y.npy"],
                       check=True, capture_output=True)  # fmt: skip
        raw = np.load(Path(tmp) / "y.npy")
    return seg.finish(raw, prepared)


def test_daemon_serves_through_a_worker_in_a_second_python_and_survives_its_crash(
    second_python_daemon: object, tpu_models: Path, test_data: Path, second_python: Path  # noqa: F811
) -> None:
    d = second_python_daemon(mode="crash_on_invoke", crash_after="3")  # type: ignore[operator]
    info = httpx.get(d.url + "/models/tpu_dm05").json()
    assert info["backend"] == "edgetpu" and info["worker"]["runtime"] == "tflite-runtime 2.14.0"
    assert info["worker"]["python"]["numpy"].startswith("1.") and info["worker"]["pairing"]["known_good"]
    data = (test_data / "bird.bmp").read_bytes()
    cpu = Segmenter.open(load_manifest(models_dir=tpu_models).get("tpu_dm05"), models_dir=tpu_models, accelerator="cpu")
    twin = cpu.segment(data).mask  # ai-edge-litert 2.3, in this process
    # The worker's mask is tflite_runtime 2.14's arithmetic (the double runs its kernels), which
    # rounds some uint8 logits of this model differently from ai-edge-litert 2.3: the expected
    # mask is segd's pipeline on tflite_runtime 2.14's own CPU output, computed in the second venv.
    want = tflite_runtime_mask(second_python, cpu, data)
    for _ in range(2):  # invokes 2 and 3 (1 was the warm-up)
        r = segment(d, data)
        assert r.headers["x-segd-backend"] == "edgetpu" and (read_mask_png(r.content) == want).all()
    assert (want == twin).mean() > 0.99  # the two runtimes agree on all but a few edge pixels
    crashed = segment(d, data)  # the delegate aborts the worker: the CPU twin answers
    assert crashed.status_code == 200 and crashed.headers["x-segd-backend"] == "cpu"
    assert (read_mask_png(crashed.content) == twin).all()
    wait_for(lambda: httpx.get(d.url + "/models/tpu_dm05").json()["worker"]["state"] == "ready")
    again = segment(d, data)
    assert again.headers["x-segd-backend"] == "edgetpu" and (read_mask_png(again.content) == want).all()
    assert "SIGABRT" in httpx.get(d.url + "/models/tpu_dm05").json()["worker"]["last_crash"]


def test_daemon_with_a_known_bad_pairing_serves_the_cpu_twin_and_says_what_to_install(
    second_python_daemon: object, stock_double: Path, test_data: Path, tmp_path: Path
) -> None:
    d = second_python_daemon(double=stock_double, pairings=False)  # type: ignore[operator]
    info = httpx.get(d.url + "/models/tpu_dm05").json()
    assert info["state"] == "ready" and info["backend"] == "cpu"
    assert "known bad" in info["reason"] and "libedgetpu1-max 16.0tf2.17.1-1" in info["reason"]
    ready = httpx.get(d.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["models"]["tpu_dm05"]["backend"] == "cpu"
    r = segment(d, (test_data / "bird.bmp").read_bytes())
    assert r.status_code == 200 and r.headers["x-segd-backend"] == "cpu"
    assert not (tmp_path / "marker").exists()  # load_delegate never ran, in any process


# --- segd doctor --------------------------------------------------------------------------------------
def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SEGD_", "FAKE_EDGETPU_"))}
    clean.update(env)
    return subprocess.run([sys.executable, "-m", "segd", "doctor", *args], env=clean, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def pairing_lines(out: str) -> str:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "] pairing" in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    return "\n".join(lines[start:end])


def test_doctor_names_the_pair_says_if_it_is_known_good_and_prints_the_commands(
    edgetpu_double: Path, stock_double: Path, second_python: Path, models_dir: Path, tmp_path: Path
) -> None:
    base = {"FAKE_EDGETPU_DEVICES": USB, "SEGD_MODELS_DIR": str(models_dir), "SEGD_EDGETPU_PYTHON": str(second_python)}
    good = doctor({**base, "SEGD_EDGETPU_LIBRARY": str(edgetpu_double),
                   "SEGD_EDGETPU_PAIRINGS": str(pairings_for(edgetpu_double, tmp_path / "p.toml", "tflite_runtime", "2.14.0"))})  # fmt: skip
    text = pairing_lines(good.stdout)
    assert text.startswith("[ ok ] pairing") and "tflite_runtime 2.14.0: good" in text and "numpy 1." in text
    bad = doctor({**base, "SEGD_EDGETPU_LIBRARY": str(stock_double)})
    text = pairing_lines(bad.stdout)
    assert text.startswith("[WARN] pairing") and "libedgetpu 16.0 from the Coral apt repository" in text
    assert "tflite_runtime 2.14.0: bad" in text and "segd will run on the CPU" in text
    assert "sudo apt-get install -y ./libedgetpu1-max_16.0tf2.17.1-1.bookworm_amd64.deb" in text
    strict = doctor({**base, "SEGD_EDGETPU_LIBRARY": str(stock_double)}, "--accelerator", "edgetpu")
    assert strict.returncode == 1 and "[FAIL] pairing" in strict.stdout
    trusted = doctor({**base, "SEGD_EDGETPU_LIBRARY": str(stock_double), "SEGD_EDGETPU_PAIRING": "trust"})
    assert pairing_lines(trusted.stdout).startswith("[WARN] pairing") and "loaded anyway" in trusted.stdout
    unknown = doctor({**base, "SEGD_EDGETPU_LIBRARY": str(edgetpu_double)})
    assert "unknown build" in pairing_lines(unknown.stdout) and "tflite_runtime 2.14.0: unknown" in unknown.stdout
    none = doctor({**base, "SEGD_EDGETPU_LIBRARY": str(tmp_path / "absent.so")})
    assert pairing_lines(none.stdout).startswith("[info] pairing    no libedgetpu to pair")


def test_the_worker_program_imports_only_the_standard_library_and_numpy() -> None:
    import ast

    from segd.runtime import tpu_worker

    tree = ast.parse(Path(tpu_worker.__file__).read_text())
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top.add(node.module.partition(".")[0])
    assert top - set(sys.stdlib_module_names) == {"numpy"}, top
    # the runtimes are imported by name at run time, only the chosen one
    assert set(tpu_worker.RUNTIMES) == {"litert", "tflite_runtime"}
