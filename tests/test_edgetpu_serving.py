"""Edge TPU selection and crash isolation, end to end, through the real test double of
libedgetpu (tests/edgetpu_double): a C library the real runtime loads as a delegate.

The double cannot execute a real ``edgetpu-custom-op`` (that needs the chip), so variants that
must *run* on the "TPU" use a CPU model as their Edge TPU file; the double then claims one of
its nodes, runs it with the builtin kernel, and can abort() mid-invoke like libedgetpu does on
a USB transfer error.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import pairings_for, read_mask_png
from daemon import Daemon, start_daemon

from segd.engine import Segmenter, open_runner
from segd.errors import RuntimeUnavailable
from segd.variants import load_manifest

DM05_CPU = "deeplabv3_mnv2_dm05_pascal_quant.tflite"
TPU_TOML = (Path(__file__).parent / "data" / "tpu_variant.toml").read_text()


@pytest.fixture(scope="module")
def tpu_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with the Coral files plus the ``tpu_dm05`` stand-in variant."""
    mdir = tmp_path_factory.mktemp("tpu_models")
    for f in models_dir.iterdir():
        shutil.copy(f, mdir / f.name)
    spec = load_manifest(models_dir=models_dir).get("deeplabv3_mnv2_dm05_pascal").cpu
    (mdir / "tpu.toml").write_text(TPU_TOML.format(name=spec.name, sha=spec.sha256))
    return mdir


def tpu_env(double: Path, **fake: str) -> dict[str, str]:
    """The daemon's environment for the double: its library, one USB device, and a pairings
    table that calls the double a known-good pair (as a user registers their own build)."""
    pairings = pairings_for(double, double.parent / "pairings.toml")
    env = {"SEGD_EDGETPU_LIBRARY": str(double), "FAKE_EDGETPU_DEVICES": "usb:/sys/bus/usb/devices/2-1",
           "SEGD_EDGETPU_PAIRINGS": str(pairings)}  # fmt: skip
    env.update({f"FAKE_EDGETPU_{k.upper()}": v for k, v in fake.items()})
    return env


# --- selection (in-process) ----------------------------------------------------------------
def test_without_libedgetpu_the_cpu_twin_is_used_and_the_reason_given(tpu_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", "/nonexistent/libedgetpu.so.1")
    variant = load_manifest(models_dir=tpu_models).get("tpu_dm05")
    runner, sel = open_runner(variant, models_dir=tpu_models)
    assert (runner.backend, sel.backend) == ("cpu", "cpu")
    assert sel.reason.startswith("libedgetpu not installed")
    with pytest.raises(RuntimeUnavailable, match="libedgetpu not installed"):
        open_runner(variant, models_dir=tpu_models, accelerator="edgetpu")


def test_with_no_device_attached_the_cpu_twin_is_used(tpu_models: Path, fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "")
    variant = load_manifest(models_dir=tpu_models).get("tpu_dm05")
    runner, sel = open_runner(variant, models_dir=tpu_models)
    assert runner.backend == "cpu" and sel.reason.startswith("no Edge TPU found")


def test_the_configured_library_is_the_one_loaded_in_process(
    tpu_models: Path, edgetpu_double: Path, double_pairings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``edgetpu_library`` from the config file (not only SEGD_EDGETPU_LIBRARY) decides which
    libedgetpu is checked, paired and loaded."""
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", "/nonexistent/libedgetpu.so.1")
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "usb:/sys/bus/usb/devices/2-1")
    variant = load_manifest(models_dir=tpu_models).get("tpu_dm05")
    runner, sel = open_runner(variant, models_dir=tpu_models, accelerator="edgetpu",
                              edgetpu_library=str(edgetpu_double), edgetpu_pairings=double_pairings)  # fmt: skip
    assert (runner.backend, sel.backend) == ("edgetpu", "edgetpu")
    runner.close()


def test_with_a_device_the_edgetpu_file_runs_through_the_delegate(
    tpu_models: Path, fake_edgetpu: Path, test_data: Path, double_pairings: Path
) -> None:
    manifest = load_manifest(models_dir=tpu_models)
    tpu = Segmenter.open(manifest.get("tpu_dm05"), models_dir=tpu_models, edgetpu_pairings=double_pairings)
    cpu = Segmenter.open(manifest.get("tpu_dm05"), models_dir=tpu_models, accelerator="cpu")
    assert tpu.backend == "edgetpu" and tpu.selection is not None
    assert tpu.selection.reason.startswith("Edge TPU found")
    data = (test_data / "bird.bmp").read_bytes()
    assert (tpu.segment(data).mask == cpu.segment(data).mask).all()


def test_compiled_coral_file_with_a_delegate_that_cannot_run_it_falls_back_with_the_reason(
    tpu_models: Path, fake_edgetpu: Path, double_pairings: Path
) -> None:
    variant = load_manifest(models_dir=tpu_models).get("deeplabv3_mnv2_dm05_pascal")
    runner, sel = open_runner(variant, models_dir=tpu_models, edgetpu_pairings=double_pairings)
    assert runner.backend == "cpu" and sel.file.name == DM05_CPU
    assert "edgetpu-custom-op" in sel.reason


def test_delegate_that_fails_to_load_is_reported_and_the_cpu_twin_serves(
    tpu_models: Path, fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch, double_pairings: Path
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "fail")
    monkeypatch.setenv("FAKE_EDGETPU_ERROR", "USB transfer error 7 while loading firmware")
    variant = load_manifest(models_dir=tpu_models).get("tpu_dm05")
    runner, sel = open_runner(variant, models_dir=tpu_models, edgetpu_pairings=double_pairings)
    assert runner.backend == "cpu" and "USB transfer error 7" in sel.reason


# --- the daemon ------------------------------------------------------------------------------
@pytest.fixture
def tpu_daemon_factory(tmp_path: Path, tpu_models: Path, edgetpu_double: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def start(*args: str, fallback: str = "cpu", **fake: str) -> Daemon:
        env = tpu_env(edgetpu_double, **fake)
        env.update({"SEGD_WORKER_RESTART_BASE": "0.2", "SEGD_TPU_FALLBACK": fallback})
        d = start_daemon(tmp_path, tpu_models, "--model", "tpu_dm05", *args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def segment(d: Daemon, data: bytes) -> httpx.Response:
    return httpx.post(d.url + "/segment", content=data, headers={"content-type": "image/bmp"}, timeout=60)


def test_daemon_serves_on_the_edgetpu_worker_after_a_passing_self_test(
    tpu_daemon_factory: object, test_data: Path, tpu_models: Path
) -> None:
    d = tpu_daemon_factory()  # type: ignore[operator]
    info = httpx.get(d.url + "/models/tpu_dm05").json()
    assert info["backend"] == "edgetpu" and info["reason"].startswith("Edge TPU found")
    assert info["selftest"]["passed"] is True and info["selftest"]["tpu_vs_cpu_agreement"] > 0.98
    assert info["worker"]["state"] == "ready" and info["worker"]["pid"] != d.proc.pid
    data = (test_data / "bird.bmp").read_bytes()
    r = segment(d, data)
    assert r.status_code == 200 and r.headers["x-segd-backend"] == "edgetpu"
    cpu = Segmenter.open(load_manifest(models_dir=tpu_models).get("tpu_dm05"), models_dir=tpu_models, accelerator="cpu")
    assert (read_mask_png(r.content) == cpu.segment(data).mask).all()


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_crash_mid_request_is_served_by_the_cpu_twin_and_the_worker_restarts(
    tpu_daemon_factory: object, test_data: Path
) -> None:
    # 1 warm-up invoke + 2 good requests, then the delegate aborts the worker process.
    d = tpu_daemon_factory(mode="crash_on_invoke", crash_after="3")  # type: ignore[operator]
    data = (test_data / "bird.bmp").read_bytes()
    backends = [segment(d, data).headers["x-segd-backend"] for _ in range(2)]
    crashed = segment(d, data)
    assert backends == ["edgetpu", "edgetpu"]
    assert crashed.status_code == 200 and crashed.headers["x-segd-backend"] == "cpu"
    wait_for(lambda: httpx.get(d.url + "/models/tpu_dm05").json()["worker"]["state"] == "ready")
    info = httpx.get(d.url + "/models/tpu_dm05").json()
    assert info["worker"]["restarts"] >= 1 and "SIGABRT" in info["worker"]["last_crash"]
    assert info["cpu_fallbacks"] >= 1
    r = segment(d, data)
    assert r.status_code == 200 and r.headers["x-segd-backend"] == "edgetpu"
    metrics = httpx.get(d.url + "/metrics").text
    assert 'segd_tpu_worker_restarts_total{model="tpu_dm05"} 1.0' in metrics
    assert 'segd_cpu_fallbacks_total{model="tpu_dm05"} 1.0' in metrics
    assert d.proc.poll() is None


def test_with_fallback_off_a_worker_crash_is_a_clear_503_and_service_continues(
    tpu_daemon_factory: object, test_data: Path
) -> None:
    d = tpu_daemon_factory(fallback="503", mode="crash_on_invoke", crash_after="2")  # type: ignore[operator]
    data = (test_data / "bird.bmp").read_bytes()
    assert segment(d, data).status_code == 200  # invoke 2: the last good one
    crashed = segment(d, data)
    assert crashed.status_code == 503, crashed.text
    assert crashed.json()["error"] == "worker_crashed" and "SIGABRT" in crashed.json()["detail"]
    assert crashed.headers["retry-after"]
    wait_for(lambda: httpx.get(d.url + "/models/tpu_dm05").json()["worker"]["state"] == "ready")
    r = segment(d, data)
    assert r.status_code == 200 and r.headers["x-segd-backend"] == "edgetpu"


def test_worker_killed_with_sigkill_mid_request_gives_503_then_recovers(
    tmp_path: Path, tpu_models: Path, edgetpu_double: Path, test_data: Path
) -> None:
    env = tpu_env(edgetpu_double, mode="hang_on_invoke", crash_after="2")
    env.update({"SEGD_WORKER_RESTART_BASE": "0.2", "SEGD_TPU_FALLBACK": "503"})
    d = start_daemon(tmp_path, tpu_models, "--model", "tpu_dm05", env=env)
    try:
        data = (test_data / "bird.bmp").read_bytes()
        assert segment(d, data).headers["x-segd-backend"] == "edgetpu"  # invoke 2 of 2 good ones
        pid = httpx.get(d.url + "/models/tpu_dm05").json()["worker"]["pid"]
        import concurrent.futures
        import signal

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(segment, d, data)  # hangs inside the worker's invoke
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            r = pending.result()
        assert r.status_code == 503 and r.json()["error"] == "worker_crashed"
        assert "SIGKILL" in r.json()["detail"] and r.headers["retry-after"]
        wait_for(lambda: httpx.get(d.url + "/models/tpu_dm05").json()["worker"]["state"] == "ready")
        # the new worker hangs again after 2 invokes: the 1st and 2nd requests succeed
        ok = segment(d, data)
        assert ok.status_code == 200 and ok.headers["x-segd-backend"] == "edgetpu"
        assert httpx.get(d.url + "/healthz").status_code == 200
    finally:
        d.stop()


def test_readyz_flips_to_503_when_the_edgetpu_disappears_and_back_when_it_returns(
    tmp_path: Path, tpu_models: Path, edgetpu_double: Path
) -> None:
    devices = tmp_path / "devices"
    devices.write_text("usb:/sys/bus/usb/devices/2-1")
    env = tpu_env(edgetpu_double, devices_file=str(devices))
    env.update({"SEGD_DEVICE_CHECK_INTERVAL": "0.1"})
    d = start_daemon(tmp_path, tpu_models, "--model", "tpu_dm05", env=env)
    try:
        assert httpx.get(d.url + "/readyz").status_code == 200
        devices.write_text("")
        wait_for(lambda: httpx.get(d.url + "/readyz").status_code == 503)
        assert httpx.get(d.url + "/readyz").json()["models"]["tpu_dm05"]["device_present"] is False
        devices.write_text("usb:/sys/bus/usb/devices/2-1")
        wait_for(lambda: httpx.get(d.url + "/readyz").status_code == 200)
    finally:
        d.stop()


def test_daemon_reports_why_the_compiled_coral_file_could_not_be_used(
    tmp_path: Path, tpu_models: Path, edgetpu_double: Path
) -> None:
    d = start_daemon(tmp_path, tpu_models, "--model", "deeplabv3_mnv2_dm05_pascal", env=tpu_env(edgetpu_double))
    try:
        info = httpx.get(d.url + "/models/deeplabv3_mnv2_dm05_pascal").json()
        assert info["backend"] == "cpu" and "edgetpu-custom-op" in info["reason"]
        assert httpx.get(d.url + "/readyz").status_code == 200
    finally:
        d.stop()



@pytest.mark.parametrize(
    ("fake", "reason"),
    [
        ({"mode": "crash_on_create"}, "Edge TPU unusable: "),  # libedgetpu aborts while opening
        ({"mode": "crash_on_invoke", "crash_after": "0"}, "Edge TPU failed its warm-up: "),
    ],
)
def test_an_edgetpu_that_crashes_at_start_up_leaves_the_variant_on_its_cpu_twin(
    tpu_daemon_factory: object, test_data: Path, fake: dict[str, str], reason: str
) -> None:
    d = tpu_daemon_factory(**fake)  # type: ignore[operator]
    info = httpx.get(d.url + "/models/tpu_dm05").json()
    assert info["state"] == "ready" and info["backend"] == "cpu"
    assert info["reason"].startswith(reason) and "SIGABRT" in info["reason"], info["reason"]
    assert httpx.get(d.url + "/readyz").status_code == 200
    r = segment(d, (test_data / "bird.bmp").read_bytes())
    assert r.status_code == 200 and r.headers["x-segd-backend"] == "cpu"


def test_a_hung_edgetpu_is_cut_off_after_tpu_timeout_and_the_cpu_twin_answers(
    tmp_path: Path, tpu_models: Path, edgetpu_double: Path, test_data: Path
) -> None:
    env = tpu_env(edgetpu_double, mode="hang_on_invoke", crash_after="2")
    env.update({"SEGD_TPU_TIMEOUT": "1", "SEGD_WORKER_RESTART_BASE": "0.2"})
    d = start_daemon(tmp_path, tpu_models, "--model", "tpu_dm05", env=env)
    try:
        data = (test_data / "bird.bmp").read_bytes()
        assert segment(d, data).headers["x-segd-backend"] == "edgetpu"  # invoke 2 of 2 good ones
        t = time.monotonic()
        r = segment(d, data)  # the worker hangs: killed after 1 s, the CPU twin answers
        assert r.status_code == 200 and r.headers["x-segd-backend"] == "cpu"
        assert 0.9 < time.monotonic() - t < 10
        wait_for(lambda: httpx.get(d.url + "/models/tpu_dm05").json()["worker"]["state"] == "ready")
        assert segment(d, data).headers["x-segd-backend"] == "edgetpu"
    finally:
        d.stop()
