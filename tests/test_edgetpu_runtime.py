"""The Edge TPU backend against a real shared library: tests/edgetpu_double/fake_edgetpu.c, built
with gcc as libedgetpu.so.1, loaded through ctypes (device API) and through the runtime's own
load_delegate (plugin API). Modes that abort() only ever run in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from segd.errors import RuntimeUnavailable
from segd.runtime import edgetpu, pairing
from segd.runtime.cpu import open_cpu

CPU_MODEL = "deeplabv3_mnv2_dm05_pascal_quant.tflite"
TPU_MODEL = "deeplabv3_mnv2_dm05_pascal_quant_edgetpu.tflite"
USB = "/sys/bus/usb/devices/2-1"
PCI = "/dev/apex_0"


@pytest.fixture(scope="module")
def cpu_model(test_data: Path) -> bytes:
    return (test_data / CPU_MODEL).read_bytes()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (513, 513, 3), dtype=np.uint8)


# --- library and devices ------------------------------------------------------------------
def test_library_path_is_the_soname_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGD_EDGETPU_LIBRARY", raising=False)
    assert edgetpu.library_path() == "libedgetpu.so.1"
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", "/opt/x/libedgetpu.so.1")
    assert edgetpu.library_path() == "/opt/x/libedgetpu.so.1"


def test_list_devices_returns_every_device_in_enumeration_order(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", f"usb:{USB},pci:{PCI},usb:/sys/bus/usb/devices/4-2")
    assert edgetpu.list_devices() == [
        edgetpu.EdgeTpuDevice("usb", USB),
        edgetpu.EdgeTpuDevice("pci", PCI),
        edgetpu.EdgeTpuDevice("usb", "/sys/bus/usb/devices/4-2"),
    ]


def test_list_devices_is_empty_when_nothing_is_attached(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "")
    assert edgetpu.list_devices() == []


def test_version_comes_from_the_library(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_VERSION", "BuildLabel(test), RuntimeVersion(13)")
    assert edgetpu.edgetpu_version() == "BuildLabel(test), RuntimeVersion(13)"
    assert edgetpu.runtime_version_of(edgetpu.edgetpu_version()) == 13


def test_probe_without_the_library_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "libedgetpu.so.1"
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", str(missing))
    status = edgetpu.library_status()
    assert not status.loadable and not status.available
    assert status.devices == () and status.version is None
    assert status.reason is not None
    assert status.reason.startswith("libedgetpu not installed (")
    assert str(missing) in status.reason  # the dlerror text
    rec = pairing.Table.load().recommended  # the hint names the known-good build of the table
    assert f"{rec.package} {rec.package_version}" in status.reason and "segd doctor" in status.reason
    with pytest.raises(RuntimeUnavailable, match="libedgetpu not installed"):
        edgetpu.list_devices()
    assert edgetpu.edgetpu_version() is None


def test_probe_of_a_library_that_is_not_libedgetpu(edgetpu_double: Path) -> None:
    # any real shared library without the edgetpu_c.h symbols: the Python extension of numpy's core
    other = sorted(Path(np.__file__).parent.glob("*/_multiarray_umath*.so"))[0]
    status = edgetpu.library_status(str(other))
    assert status.loadable and not status.available
    assert status.reason == f"{other} is not libedgetpu (it has no edgetpu_list_devices)"


def test_probe_with_the_library_but_no_device(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "")
    status = edgetpu.library_status()
    assert status.loadable and not status.available and status.devices == ()
    assert (
        status.reason
        == "no Edge TPU found (libedgetpu runtime version 14 sees no USB or PCIe device)"
    )


def test_probe_with_devices_reports_them_and_no_reason(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", f"pci:{PCI}")
    status = edgetpu.library_status()
    assert status.available and status.reason is None
    assert status.library == str(fake_edgetpu)
    assert status.devices == (edgetpu.EdgeTpuDevice("pci", PCI),)
    assert status.describe()["devices"] == [{"type": "pci", "path": PCI}]


# --- device option ------------------------------------------------------------------------
def test_device_option_passes_libedgetpu_forms_and_maps_paths_to_an_index() -> None:
    devices = [edgetpu.EdgeTpuDevice("usb", USB), edgetpu.EdgeTpuDevice("pci", PCI)]
    for form in ("", "usb", "usb:3", "pci", "pci:0", ":1"):
        assert edgetpu.device_option(form, devices) == form
    assert edgetpu.device_option(None, devices) == ""
    assert edgetpu.device_option(PCI, devices) == ":1"
    with pytest.raises(RuntimeUnavailable, match="no Edge TPU at '/dev/apex_7'"):
        edgetpu.device_option("/dev/apex_7", devices)


# --- open_edgetpu -------------------------------------------------------------------------
def test_open_edgetpu_runs_a_cpu_model_exactly_like_open_cpu(
    fake_edgetpu: Path, cpu_model: bytes, image: np.ndarray
) -> None:
    runner = edgetpu.open_edgetpu(cpu_model, device="usb:0")
    reference = open_cpu(cpu_model)
    try:
        assert runner.backend == "edgetpu"
        assert runner.device == USB
        assert runner.describe()["backend"] == "edgetpu"
        out = runner.run(image)
        assert out.shape == (513, 513) and out.dtype == np.int64
        np.testing.assert_array_equal(out, reference.run(image))
    finally:
        runner.close()
        reference.close()


def test_open_edgetpu_accepts_a_device_path_from_the_listing(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch, cpu_model: bytes
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", f"usb:{USB},pci:{PCI}")
    runner = edgetpu.open_edgetpu(cpu_model, device=PCI)
    assert runner.device == PCI  # the plugin was given ":1"; the chip is identified by its path
    runner.close()


def test_delegate_failure_message_reaches_the_error(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch, cpu_model: bytes
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "fail")
    monkeypatch.setenv("FAKE_EDGETPU_ERROR", "Could not map Edge TPU DMA buffer")
    with pytest.raises(RuntimeUnavailable) as info:
        edgetpu.open_edgetpu(cpu_model, device="usb")
    assert info.value.detail == (
        "Edge TPU delegate creation failed on device usb: Could not map Edge TPU DMA buffer"
    )


def test_silent_delegate_failure_is_explained(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch, cpu_model: bytes
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "empty_error")
    with pytest.raises(RuntimeUnavailable) as info:
        edgetpu.open_edgetpu(cpu_model, device="usb:0")
    assert info.value.detail.startswith(
        "libedgetpu could not open device usb:0 (no Edge TPU attached?)"
    )
    assert f"libedgetpu lists usb {USB}" in info.value.detail


def test_asking_for_a_device_that_is_not_there(
    fake_edgetpu: Path, monkeypatch: pytest.MonkeyPatch, cpu_model: bytes
) -> None:
    # the double, like libedgetpu, returns no delegate and no message
    with pytest.raises(
        RuntimeUnavailable, match=r"could not open device pci:2 \(no Edge TPU attached\?\)"
    ):
        edgetpu.open_edgetpu(cpu_model, device="pci:2")
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "")
    with pytest.raises(
        RuntimeUnavailable, match=r"^no Edge TPU found \(libedgetpu runtime version 14"
    ):
        edgetpu.open_edgetpu(cpu_model)


def test_open_edgetpu_without_the_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpu_model: bytes
) -> None:
    monkeypatch.setenv("SEGD_EDGETPU_LIBRARY", str(tmp_path / "libedgetpu.so.1"))
    with pytest.raises(RuntimeUnavailable, match=r"^libedgetpu not installed .* libedgetpu1-max 16.0tf2.17.1-1"):
        edgetpu.open_edgetpu(cpu_model)


def test_compiled_model_without_a_real_tpu_is_a_clear_error_not_a_crash(
    fake_edgetpu: Path, test_data: Path
) -> None:
    with pytest.raises(RuntimeUnavailable) as info:
        edgetpu.open_edgetpu((test_data / TPU_MODEL).read_bytes())
    assert "did not take the model's edgetpu-custom-op ops" in info.value.detail
    assert "unresolved custom op 'edgetpu-custom-op'" in info.value.detail


# --- the double's crash modes, each in its own process ------------------------------------
CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from segd.runtime.edgetpu import open_edgetpu
    model = open(sys.argv[1], "rb").read()
    runner = open_edgetpu(model, device="usb")
    print("opened", flush=True)
    x = np.zeros((513, 513, 3), np.uint8)
    for i in range(3):
        runner.run(x)
        print("ran", i, flush=True)
    """
)


def _run_crash_script(model: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_EDGETPU_")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(model)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_crash_on_create_aborts_the_process(edgetpu_double: Path, test_data: Path) -> None:
    proc = _run_crash_script(
        test_data / CPU_MODEL,
        {"SEGD_EDGETPU_LIBRARY": str(edgetpu_double), "FAKE_EDGETPU_MODE": "crash_on_create"},
    )
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert "opened" not in proc.stdout
    assert "aborting in tflite_plugin_create_delegate" in proc.stderr


def test_crash_on_invoke_claims_a_node_and_aborts_after_the_good_invocations(
    edgetpu_double: Path, test_data: Path
) -> None:
    proc = _run_crash_script(
        test_data / CPU_MODEL,
        {
            "SEGD_EDGETPU_LIBRARY": str(edgetpu_double),
            "FAKE_EDGETPU_MODE": "crash_on_invoke",
            "FAKE_EDGETPU_CRASH_AFTER": "2",
        },
    )
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["opened", "ran 0", "ran 1"]
    assert "ran 2" not in proc.stdout
    assert "simulated USB transfer error on invocation 3" in proc.stderr
