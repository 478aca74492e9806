"""``segd doctor``: the real command against the real machine and the Edge TPU test double (a real
libedgetpu.so.1 built from tests/edgetpu_double), and its checks against sysfs/dev/udev trees laid
out like a Raspberry Pi's."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segd import doctor
from segd.doctor import Finding
from segd.runtime.edgetpu import EdgeTpuStatus

REPO = Path(__file__).resolve().parent.parent
USB_PATH = "/sys/bus/usb/devices/2-1"
STOCK_VERSION = (
    "BuildLabel(COMPILER=6.3.0 20170516,DATE=redacted,TIME=redacted), RuntimeVersion(14)"
)
DM1 = "deeplabv3_mnv2_pascal"
SEGD = f"{sys.prefix}/bin/segd"  # fix lines name the segd of this installation


def run_doctor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SEGD_", "FAKE_EDGETPU_"))}
    clean.update(env)
    return subprocess.run([sys.executable, "-m", "segd", "doctor", *args], env=clean,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def findings_of(proc: subprocess.CompletedProcess[str]) -> list[Finding]:
    return [Finding(**f) for f in json.loads(proc.stdout)["findings"]]


def by_check(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check]


# --- the command, with the double present ----------------------------------------------------
def test_with_a_usb_tpu_on_the_double_libedgetpu_devices_and_both_model_files_are_ok(
    edgetpu_double: Path, models_dir: Path
) -> None:
    env = {"SEGD_EDGETPU_LIBRARY": str(edgetpu_double), "FAKE_EDGETPU_DEVICES": f"usb:{USB_PATH}",
           "FAKE_EDGETPU_VERSION": STOCK_VERSION, "SEGD_MODELS_DIR": str(models_dir)}  # fmt: skip
    proc = run_doctor(env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"[ ok ] libedgetpu {edgetpu_double} loads, version {STOCK_VERSION}" in out
    assert f"[ ok ] devices    libedgetpu lists 1 Edge TPU(s): usb {USB_PATH}" in out
    assert (
        f"[ ok ] models     {DM1}: deeplabv3_mnv2_pascal_quant.tflite present, sha256 350af47fd346… matches"
        in out
    )
    assert (
        f"[ ok ] models     {DM1}: deeplabv3_mnv2_pascal_quant_edgetpu.tflite present, sha256 4d899a809ac1… matches"
        in out
    )
    if not Path(USB_PATH).exists():  # this machine has no such sysfs node: say so, do not guess
        assert f"{USB_PATH}: link speed not readable" in out

    js = findings_of(run_doctor("--json", env=env))
    assert {f.level for f in by_check(js, "libedgetpu") + by_check(js, "devices")} == {"ok"}


def test_with_no_tpu_attached_auto_warns_and_edgetpu_fails_with_what_to_plug_in(
    edgetpu_double: Path, models_dir: Path
) -> None:
    env = {"SEGD_EDGETPU_LIBRARY": str(edgetpu_double), "FAKE_EDGETPU_DEVICES": "",
           "FAKE_EDGETPU_VERSION": STOCK_VERSION, "SEGD_MODELS_DIR": str(models_dir)}  # fmt: skip
    auto = run_doctor(env=env)
    assert auto.returncode == 0, auto.stdout
    assert (
        "[WARN] devices    no Edge TPU found (libedgetpu runtime version 14 sees no USB or PCIe device)"
        in auto.stdout
    )
    assert (
        "fix:  plug the USB Accelerator into a USB 3 port; `lsusb -d 18d1:9302` or `lsusb -d 1a6e:089a` must list it"
        in auto.stdout
    )
    # The Edge TPU file is then not needed: its absence would only be information.
    strict = run_doctor("--accelerator", "edgetpu", env=env)
    assert strict.returncode == 1
    assert "[FAIL] devices    no Edge TPU found" in strict.stdout
    assert strict.stdout.rstrip().endswith(
        "segd cannot serve as configured until the errors are fixed"
    )


# --- the command, with the library absent ----------------------------------------------------
def test_without_libedgetpu_the_fix_is_the_known_good_pair(models_dir: Path) -> None:
    # No SEGD_EDGETPU_LIBRARY: segd asks the loader for the soname, as on a Pi without the
    # package; the fix must then install the known-good pair (not Coral's stock 16.0, which
    # crashes inside any TFLite newer than 2.11: segd/data/edgetpu_pairings.toml).
    env = {"SEGD_MODELS_DIR": str(models_dir)}
    if (
        shutil.which("ldconfig")
        and "libedgetpu.so.1"
        in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    ):
        pytest.skip("a real libedgetpu is installed on this machine")
    proc = run_doctor(env=env)
    assert proc.returncode == 0, proc.stdout
    out = proc.stdout
    assert (
        "[WARN] libedgetpu libedgetpu not installed (libedgetpu.so.1: cannot open shared object file"
        in out
    )
    assert "segd will run on the CPU" in out
    assert "curl -fsSL -o ./libedgetpu1-max_16.0tf2.17.1-1.bookworm_" in out
    assert "sudo apt-get install -y ./libedgetpu1-max_16.0tf2.17.1-1.bookworm_" in out
    assert "tflite_runtime-2.17.1-cp311-cp311-linux_" in out and "packages.cloud.google.com" not in out

    strict = run_doctor("--accelerator", "edgetpu", env=env)
    assert strict.returncode == 1
    assert "[FAIL] libedgetpu libedgetpu not installed" in strict.stdout
    assert "SEGD_ACCELERATOR=edgetpu: segd will not start" in strict.stdout


def test_a_library_path_that_does_not_exist_is_named_in_the_fix(
    models_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "libedgetpu.so.1"
    proc = run_doctor(
        env={"SEGD_MODELS_DIR": str(models_dir), "SEGD_EDGETPU_LIBRARY": str(missing)}
    )
    assert proc.returncode == 0
    assert (
        f"[WARN] libedgetpu libedgetpu not installed ({missing}: cannot open shared object file"
        in proc.stdout
    )
    assert (
        f"fix:  SEGD_EDGETPU_LIBRARY={missing} is set: point it at an existing libedgetpu.so.1 or unset it"
        in proc.stdout
    )


# --- models ------------------------------------------------------------------------------------
def test_missing_model_files_are_fetched_at_start_and_a_corrupt_one_is_an_error(
    tmp_path: Path, test_data: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"SEGD_MODELS_DIR": str(empty), "SEGD_ACCELERATOR": "cpu"}
    proc = run_doctor(env=env)
    assert proc.returncode == 0, proc.stdout
    assert (f"[WARN] models     {DM1}: deeplabv3_mnv2_pascal_quant.tflite is not in {empty}; segd fetches it at "
            "start-up from https://github.com/google-coral/test_data/raw/master/deeplabv3_mnv2_pascal_quant.tflite") in proc.stdout  # fmt: skip
    assert f"fix:  to fetch it now: {SEGD} models pull {DM1} --models-dir {empty}" in proc.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    good = (test_data / "deeplabv3_mnv2_pascal_quant.tflite").read_bytes()
    (bad / "deeplabv3_mnv2_pascal_quant.tflite").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    proc = run_doctor(env={**env, "SEGD_MODELS_DIR": str(bad)})
    assert proc.returncode == 1
    assert (
        f"[FAIL] models     {DM1}: {bad}/deeplabv3_mnv2_pascal_quant.tflite has sha256"
        in proc.stdout
    )
    assert f"fix:  {SEGD} models pull {DM1} --force --models-dir {bad}" in proc.stdout

    unknown = run_doctor(env={**env, "SEGD_MODELS": "deeplab_nope"})
    assert unknown.returncode == 1
    assert "SEGD_MODELS names 'deeplab_nope', which is not in the manifest" in unknown.stdout


def test_env_file_settings_are_the_ones_checked(tmp_path: Path, models_dir: Path) -> None:
    env_file = tmp_path / "segd.env"
    env_file.write_text((REPO / "systemd" / "segd.env").read_text()
                        + f"\nSEGD_MODELS_DIR={models_dir}\nSEGD_MODELS=deeplabv3_mnv2_dm05_pascal\nSEGD_ACCELERATOR=cpu\n")  # fmt: skip
    proc = run_doctor("--env-file", str(env_file), "--json", env={})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    models = by_check(findings_of(proc), "models")
    assert [f.level for f in models if "dm05" in f.message and "present" in f.message] == ["ok"]
    assert not any("_edgetpu.tflite" in f.message for f in models)  # accelerator=cpu: not needed


# --- the checks, on trees laid out like a Raspberry Pi's ------------------------------------------
def _usb_device(
    sysfs: Path, name: str, vendor: str, product: str, speed: str, bus: int, dev: int
) -> None:
    d = sysfs / "bus" / "usb" / "devices" / name
    d.mkdir(parents=True)
    for key, value in {"idVendor": vendor, "idProduct": product, "speed": speed,
                       "busnum": str(bus), "devnum": str(dev)}.items():  # fmt: skip
        (d / key).write_text(value + "\n")


def _node(dev: Path, bus: int, num: int, mode: int, gid: int) -> Path:
    node = dev / "bus" / "usb" / f"{bus:03d}" / f"{num:03d}"
    node.parent.mkdir(parents=True, exist_ok=True)
    node.write_bytes(b"")
    os.chmod(node, mode)
    if os.geteuid() == 0:
        os.chown(node, -1, gid)
    return node


def test_usb_link_speed_firmware_state_and_node_permissions_are_reported(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    plugdev = grp.getgrnam("plugdev").gr_gid
    _usb_device(sysfs, "2-1", "18d1", "9302", "5000", 2, 3)  # Pi 4 blue port
    _usb_device(sysfs, "1-1.3", "18d1", "9302", "480", 1, 4)  # black port / Pi 3
    _usb_device(sysfs, "1-1.4", "1a6e", "089a", "480", 1, 5)  # firmware not loaded yet
    _usb_device(sysfs, "1-1.1", "0424", "9514", "480", 1, 2)  # a hub: not ours
    _node(dev, 2, 3, 0o660, plugdev)
    _node(dev, 1, 4, 0o664, 0)  # what udev's default gives without our rule
    _node(dev, 1, 5, 0o660, plugdev)

    tpus = doctor.usb_tpus(sysfs, dev)
    assert [(t.sysfs_path.name, t.speed_mbps) for t in tpus] == [
        ("1-1.3", 480.0),
        ("1-1.4", 480.0),
        ("2-1", 5000.0),
    ]
    found = doctor.check_usb(sysfs, dev, [])
    text = "\n".join(f"{f.level} {f.message} | {f.fix}" for f in found)
    assert "ok 2-1 (18d1:9302): USB 3 link (5000 Mb/s)" in text
    assert "warn 1-1.3 (18d1:9302): linked at 480 Mb/s (USB 2 or slower)" in text
    assert "blue USB 3 port" in text
    assert "info 1-1.4 (1a6e:089a): USB Accelerator without firmware yet" in text
    if os.geteuid() == 0:
        assert (
            f"warn {dev}/bus/usb/001/004 is group root mode 0664: members of plugdev cannot open it"
            in text
        )
    assert f"{dev}/bus/usb/002/003" not in text and f"{dev}/bus/usb/001/005" not in text


def test_a_tpu_on_the_bus_that_libedgetpu_cannot_list_points_at_permissions(tmp_path: Path) -> None:
    _usb_device(tmp_path, "2-1", "18d1", "9302", "5000", 2, 3)
    status = EdgeTpuStatus("libedgetpu.so.1", True, STOCK_VERSION, (), "no Edge TPU found (...)")
    usb = doctor.usb_tpus(tmp_path, tmp_path / "dev")
    [finding] = doctor.check_devices(status, "auto", usb, has_pcie=False)
    assert finding.level == "warn"
    assert (
        finding.fix is not None
        and "the bus shows 1 USB Accelerator(s) that libedgetpu does not list" in finding.fix
    )
    missing = EdgeTpuStatus("libedgetpu.so.1", False, None, (), "libedgetpu not installed (...)")
    [finding] = doctor.check_devices(missing, "auto", usb, has_pcie=False)
    assert finding.message.startswith(
        "an Edge TPU is attached (1 USB, PCIe: no) but libedgetpu is not installed"
    )


def test_pcie_apex_node_permissions(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    assert doctor.check_pcie(sysfs, dev)[0].message.startswith("no PCIe/M.2 Edge TPU")
    (sysfs / "class" / "apex" / "apex_0").mkdir(parents=True)
    found = doctor.check_pcie(sysfs, dev)
    assert [f.level for f in found] == ["warn"] and "apex_* is missing" in found[0].message
    dev.mkdir()
    (dev / "apex_0").write_bytes(b"")
    os.chmod(dev / "apex_0", 0o600)
    [finding] = doctor.check_pcie(sysfs, dev)
    assert finding.level == "warn"
    try:
        grp.getgrnam("apex")
        assert "members of apex cannot open it" in finding.message
    except KeyError:
        assert finding.message == "group apex does not exist (sudo groupadd --system apex)"


def test_udev_rules_are_found_in_any_rules_directory(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    lib.mkdir()
    assert [f.level for f in doctor.check_udev([etc, lib], "auto")] == ["warn", "info"]
    assert [f.level for f in doctor.check_udev([etc, lib], "cpu")] == ["info", "info"]
    # Coral's own package rule (vendor IDs only) counts as well as ours.
    (lib / "60-libedgetpu1-std.rules").write_text('SUBSYSTEM=="usb",ATTRS{idVendor}=="1a6e",GROUP="plugdev"\n'
                                                  'SUBSYSTEM=="usb",ATTRS{idVendor}=="18d1",GROUP="plugdev"\n')  # fmt: skip
    assert [f.level for f in doctor.check_udev([etc, lib], "auto")] == ["ok", "info"]
    shutil.copy(REPO / "systemd" / "99-coral-edgetpu.rules", etc)
    found = doctor.check_udev([etc, lib], "auto")
    assert [f.level for f in found] == ["ok", "ok"]
    assert str(etc / "99-coral-edgetpu.rules") in found[0].message


# --- pure checks ---------------------------------------------------------------------------------
def test_runtime_check_names_the_cpu_runtime_and_fails_without_one() -> None:
    versions = {"litert": "2.3.0", "tflite_runtime": "2.14.0"}
    [ok] = doctor.check_runtime(versions, "litert")
    assert ok.level == "ok" and "ai-edge-litert 2.3.0 runs the models on the CPU" in ok.message
    [none] = doctor.check_runtime({"litert": None, "tflite_runtime": None}, None)
    assert (
        none.level == "error" and none.fix is not None and "pip install ai-edge-litert" in none.fix
    )


def test_python_version_and_32_bit_userland() -> None:
    assert doctor.check_python((3, 9, 2), "aarch64")[0].level == "error"
    assert [f.level for f in doctor.check_python((3, 11, 2), "aarch64")] == ["ok"]
    armv7 = doctor.check_python((3, 11, 2), "armv7l")
    assert [f.level for f in armv7] == ["ok", "warn"] and "64-bit Raspberry Pi OS" in (
        armv7[1].fix or ""
    )


def test_dpkg_status_names_the_installed_libedgetpu_package(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text(
        "Package: libedgetpu1-std\nStatus: deinstall ok config-files\nVersion: 16.0\n\n"
        "Package: libedgetpu1-max\nStatus: install ok installed\nArchitecture: arm64\nVersion: 16.0\n"
        "Description: Support library for Edge TPU\n more text: here\n\n"
        "Package: libusb-1.0-0\nStatus: install ok installed\nVersion: 2:1.0.26-1\n"
    )
    assert doctor.dpkg_packages(status) == {"libedgetpu1-max": "16.0"}
    assert doctor.dpkg_packages(tmp_path / "absent") == {}


def test_service_check_reads_the_installed_unit_and_the_env_file_mode(tmp_path: Path) -> None:
    from segd.install import data_file, render_unit

    unit = tmp_path / "segd.service"
    assert doctor.check_service(unit, None)[0].level == "warn"
    segd_exe = Path(sys.prefix) / "bin" / "segd"
    unit.write_text(render_unit(data_file("segd.service").read_text(), str(segd_exe)))
    env_file = tmp_path / "segd.env"
    env_file.write_text("SEGD_API_KEY=secret\n")
    os.chmod(env_file, 0o644)
    found = [f for f in doctor.check_service(unit, env_file) if "segd.service is" not in f.message]
    assert [(f.level, f.message) for f in found] == [
        ("ok", f"{unit} runs {segd_exe}"),
        ("warn", f"{env_file} holds the API key and is world-readable (mode 0644)"),
    ]
    unit.write_text(render_unit(unit.read_text(), "/opt/nowhere/bin/segd"))
    assert doctor.check_service(unit, None)[0].level == "error"


def test_exit_code_is_one_exactly_when_there_is_an_error() -> None:
    assert (
        doctor.exit_code(
            [Finding("a", "ok", "x"), Finding("b", "warn", "y"), Finding("c", "info", "z")]
        )
        == 0
    )
    assert doctor.exit_code([Finding("a", "ok", "x"), Finding("b", "error", "y")]) == 1


def test_cameras_and_mqtt_need_ffmpeg_and_paho(tmp_path: Path) -> None:
    from segd.doctor import check_sources
    from segd.settings import load_settings

    config = tmp_path / "segd.toml"
    config.write_text('[sources.gate]\nurl = "rtsp://10.0.0.2/s"\n[sources.yard]\nurl = "http://10.0.0.3/v.mjpg"\n'
                      '[mqtt]\nhost = "broker.lan"\n')  # fmt: skip
    s = load_settings(config, env={})
    missing = check_sources(s, None, False)
    assert [(f.check, f.level) for f in missing] == [("sources", "error"), ("mqtt", "error")]
    assert "gate" in missing[0].message and "yard" not in missing[0].message
    assert missing[0].fix == "sudo apt-get install -y ffmpeg" and "paho-mqtt" in str(missing[1].fix)
    present = check_sources(s, "/usr/bin/ffmpeg", True)
    assert [f.level for f in present] == ["ok", "ok"] and "broker.lan:1883" in present[1].message
    assert check_sources(load_settings(env={}), None, False) == []  # nothing configured, nothing needed


def test_service_check_takes_the_mirror_from_the_env_file_and_flags_one_the_sandbox_hides(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "models"
    env_file = tmp_path / "segd.env"
    base = f"SEGD_MODELS_DIR={empty}\nSEGD_MODELS={DM1}\nSEGD_ACCELERATOR=cpu\n"
    env_file.write_text(base + "SEGD_MODEL_MIRROR=/srv/segd-mirror\n")
    proc = run_doctor("--service", "--env-file", str(env_file), "--json", env={})
    models = by_check(findings_of(proc), "models")
    assert any("fetches it at start-up from /srv/segd-mirror" in f.message for f in models), models

    env_file.write_text(base + "SEGD_MODEL_MIRROR=/root/segd-mirror\n")
    proc = run_doctor("--service", "--env-file", str(env_file), "--json", env={})
    assert proc.returncode == 1
    [hidden] = [f for f in by_check(findings_of(proc), "models") if "ProtectHome" in f.message]
    assert hidden.level == "error" and "SEGD_MODEL_MIRROR=/root/segd-mirror is under /root" in hidden.message
    assert hidden.fix is not None and "/srv/segd-models" in hidden.fix

    # The same mirror for `segd serve` run by hand is fine: no sandbox there.
    proc = run_doctor("--env-file", str(env_file), "--json", env={})
    assert not any("ProtectHome" in f.message for f in findings_of(proc))
