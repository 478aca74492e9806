"""``segd doctor``: what this machine has and lacks for segd, and what to do about each gap.

Every check returns :class:`Finding` s (level ok / info / warn / error, a message, and for
problems the command or step that fixes it). Errors are what stops segd from serving what it
is configured to serve (no runtime, a corrupt model file, no Edge TPU with
``accelerator=edgetpu``); warnings are what makes it slower or fall back to the CPU. The exit
status is 1 when there is an error.

The checks read the machine through paths in :class:`MachinePaths` (``/sys``, ``/dev``, the udev and
dpkg directories) so they can be pointed at a copy; nothing here writes anything.

One module (~700 lines) on purpose: it is a list of small independent checks, each with the
sentence that fixes what it finds, sharing only :class:`Finding` and the report. The sections
below (runtimes, libedgetpu and devices, udev/groups/service, models) are where it splits if
it grows.
"""

from __future__ import annotations

import argparse
import grp
import importlib.util
import json
import os
import platform
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segd.settings import ACCELERATORS, config_path, environment

if TYPE_CHECKING:  # the settings module pulls in numpy/OpenCV: not needed to build the CLI parser
    from segd.settings import Settings

LEVELS = ("ok", "info", "warn", "error")
SERVICE_ENV_FILE = Path("/etc/segd/segd.env")
SERVICE_MODELS_DIR = "/var/lib/segd/models"
SERVICE_UNIT = Path("/etc/systemd/system/segd.service")
USB_IDS = {("18d1", "9302"): "ready", ("1a6e", "089a"): "no firmware"}


def known_good_commands(machine: str | None = None) -> str:
    """The commands that install the known-good libedgetpu/TFLite pair (segd/data/edgetpu_pairings.toml)."""
    from segd.runtime import pairing

    rec = pairing.Table.load().recommended
    commands = pairing.install_commands(rec, machine)
    if not commands:
        return pairing.install_advice(rec, machine)
    return f"install the known-good pair {rec.label()} (docs/RASPBERRY_PI.md):\n" + "\n".join(commands)


def _segd_command() -> str:
    """How to call this segd in a fix line (it need not be on PATH, e.g. /opt/segd/bin/segd)."""
    from segd.install import default_exec

    return default_exec()


SEGD = _segd_command()
INSTALL_RULES = f"sudo {SEGD} install-service   (installs /etc/udev/rules.d/99-coral-edgetpu.rules), then unplug and replug the Accelerator"


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # ok | info | warn | error
    message: str
    fix: str | None = None


@dataclass
class MachinePaths:
    """Where the checks look. Defaults are the real machine."""

    settings: Settings
    library: str
    sysfs: Path = Path("/sys")
    dev: Path = Path("/dev")
    udev_dirs: tuple[Path, ...] = (
        Path("/etc/udev/rules.d"), Path("/run/udev/rules.d"),
        Path("/usr/lib/udev/rules.d"), Path("/lib/udev/rules.d"),
    )  # fmt: skip
    dpkg_status: Path = Path("/var/lib/dpkg/status")
    service: bool = False
    unit: Path = SERVICE_UNIT
    env_file: Path | None = None
    env: Mapping[str, str] = field(default_factory=environment)


# --- python and runtimes ---------------------------------------------------------------------
def check_python(
    version: tuple[int, ...] | None = None, machine: str | None = None
) -> list[Finding]:
    version = version or tuple(sys.version_info[:3])
    machine = machine or platform.machine()
    shown = ".".join(str(v) for v in version)
    if version < (3, 11):
        return [Finding("python", "error", f"Python {shown} is too old; segd needs 3.11 or newer",
                        "use Raspberry Pi OS bookworm (Python 3.11) or install python3.11")]  # fmt: skip
    found = [Finding("python", "ok", f"Python {shown} on {machine} ({sys.executable})")]
    if machine in ("armv7l", "armv6l"):
        found.append(Finding(
            "python", "warn",
            f"32-bit userland ({machine}): ai-edge-litert has no wheels for it and numpy/OpenCV none on PyPI",
            "install the 64-bit Raspberry Pi OS (bookworm, arm64); for 32-bit see the \"32-bit\" section of docs/RASPBERRY_PI.md",
        ))  # fmt: skip
    return found


def check_runtime(versions: Mapping[str, str | None], chosen: str | None) -> list[Finding]:
    """The CPU runtime. ``versions``: runtime name -> installed version (None: not installed);
    ``chosen``: the one segd will use (None: none importable). Which runtime the Edge TPU
    worker uses is :func:`check_pairing`'s."""
    from segd.runtime.cpu import RUNTIMES

    def dist(name: str) -> str:
        return RUNTIMES[name][1] if name in RUNTIMES else name

    listed = ", ".join(
        f"{dist(n)} {v}" if v else f"{dist(n)} not installed" for n, v in versions.items()
    )
    if chosen is None:
        return [Finding("runtime", "error", f"no TFLite runtime can be imported ({listed})",
                        "pip install ai-edge-litert   (into segd's venv: /opt/segd/bin/pip install ai-edge-litert)")]  # fmt: skip
    return [Finding("runtime", "ok", f"{dist(chosen)} {versions.get(chosen)} runs the models on the CPU (installed: {listed})")]


def worker_environment(python: str | None, timeout: float = 60.0) -> dict[str, Any]:
    """What the Edge TPU worker's Python has (tpu_worker's hello): its runtimes and numpy."""
    from segd.runtime import tpu_worker

    if python is None:
        return tpu_worker.hello()
    proc = subprocess.run([python, "-I", tpu_worker.__file__, "--hello"], capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1])
    env: dict[str, Any] = json.loads(proc.stdout)
    return env


def check_pairing(decision: Any, accelerator: str, worker: Mapping[str, Any] | None, machine: str | None = None) -> list[Finding]:
    """``decision``: :class:`segd.runtime.pairing.Decision` for the installed libedgetpu and the
    worker's runtimes (None: no libedgetpu loads). Names the pair, says whether it is known good,
    and prints the commands for the known-good pair when it is not."""
    fix = known_good_commands(machine)
    where = f" under {worker['python']} (Python {worker['python_version']}, numpy {worker['numpy']})" if worker else ""
    if decision is None:
        return [Finding("pairing", "info", f"no libedgetpu to pair with a TFLite runtime{where}", fix)]
    lib = decision.library
    package = f"{lib.package} {lib.package_version}" if lib.package else "no Debian package"
    name = decision.build.name if decision.build else "unknown build"
    installed = ", ".join(f"{v.runtime} {v.version}: {v.verdict}" for v in decision.verdicts) or "no TFLite runtime"
    how = f"recognised by {decision.recognised_by}" if decision.build else f"looked at {decision.recognised_by}"
    head = f"libedgetpu {lib.path or lib.library} ({package}; {name}; {how}) with {installed}{where}"
    if decision.runtime is not None and decision.known_good:
        return [Finding("pairing", "ok", f"{head} — the Edge TPU worker uses {decision.runtime}: {decision.message}")]
    if decision.runtime is not None:  # edgetpu_pairing = "trust"
        return [Finding("pairing", "warn", f"{head} — {decision.message}", fix)]
    level = "error" if accelerator == "edgetpu" else ("info" if accelerator == "cpu" else "warn")
    consequence = {"error": "SEGD_ACCELERATOR=edgetpu: segd will not start", "warn": "segd will run on the CPU",
                   "info": "not needed: SEGD_ACCELERATOR=cpu"}[level]  # fmt: skip
    return [Finding("pairing", level, f"{head} — not a known-good pair, the Edge TPU worker will not load it; {consequence}", fix)]


# --- libedgetpu and devices ------------------------------------------------------------------
def check_libedgetpu(
    status: Any, accelerator: str, packages: Mapping[str, str], env_library: str | None
) -> list[Finding]:
    """``status``: :class:`segd.runtime.edgetpu.EdgeTpuStatus`."""
    level = "error" if accelerator == "edgetpu" else ("info" if accelerator == "cpu" else "warn")
    consequence = {"error": "SEGD_ACCELERATOR=edgetpu: segd will not start",
                   "warn": "segd will run on the CPU", "info": "not needed: SEGD_ACCELERATOR=cpu"}[level]  # fmt: skip
    pkg = ", ".join(f"{n} {v}" for n, v in packages.items())
    if not status.loadable:
        fix = f"SEGD_EDGETPU_LIBRARY={env_library} is set: point it at an existing libedgetpu.so.1 or unset it" if env_library else (
            known_good_commands())  # fmt: skip
        if pkg and not env_library:
            fix = f"dpkg lists {pkg} but the loader cannot load it: sudo apt-get install --reinstall {next(iter(packages))}"
        return [Finding("libedgetpu", level, f"{status.reason}; {consequence}", fix)]
    variant = f" [{pkg}]" if pkg else ""
    return [
        Finding(
            "libedgetpu",
            "ok",
            f"{status.library} loads, version {status.version or 'unknown'}{variant}",
        )
    ]


def dpkg_packages(
    status_file: Path, names: Iterable[str] = ("libedgetpu1-std", "libedgetpu1-max")
) -> dict[str, str]:
    """Installed versions of the given Debian packages, from dpkg's status database."""
    from segd.runtime.pairing import dpkg_packages as read

    return read(status_file, names)


@dataclass(frozen=True)
class UsbTpu:
    sysfs_path: Path
    vendor: str
    product: str
    speed_mbps: float | None
    node: Path | None  # /dev/bus/usb/BBB/DDD


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def usb_tpus(sysfs: Path, dev: Path) -> list[UsbTpu]:
    """Coral USB Accelerators in sysfs (either ID), with their link speed and device node."""
    found = []
    base = sysfs / "bus" / "usb" / "devices"
    for entry in sorted(base.glob("*")) if base.is_dir() else []:
        ids = (_read(entry / "idVendor"), _read(entry / "idProduct"))
        if ids not in USB_IDS:
            continue
        speed = _read(entry / "speed")
        bus, num = _read(entry / "busnum"), _read(entry / "devnum")
        node = (
            dev / "bus" / "usb" / f"{int(bus):03d}" / f"{int(num):03d}"
            if bus and num and bus.isdigit() and num.isdigit()
            else None
        )
        found.append(
            UsbTpu(
                entry,
                ids[0] or "",
                ids[1] or "",
                float(speed) if speed and _is_number(speed) else None,
                node,
            )
        )
    return found


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def node_access(node: Path, group: str) -> str | None:
    """Why the service (a user in ``group``) could not open ``node`` read-write, or None."""
    try:
        st = node.stat()
    except OSError as exc:
        return f"{node}: {exc.strerror}"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"group {group} does not exist (sudo groupadd --system {group})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o006 == 0o006:
        return None
    if st.st_gid == gid and mode & 0o060 == 0o060:
        return None
    owner = _group_name(st.st_gid)
    return f"{node} is {owner} mode {mode:04o}: members of {group} cannot open it (the udev rule did not apply)"


def _group_name(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name}"
    except KeyError:
        return f"gid {gid}"


def check_usb(sysfs: Path, dev: Path, listed: list[Any]) -> list[Finding]:
    """USB Accelerators: firmware state, link speed, device node permissions."""
    found: list[Finding] = []
    tpus = usb_tpus(sysfs, dev)
    known = {str(t.sysfs_path) for t in tpus}
    for device in listed:  # libedgetpu's paths are sysfs paths too; read what sysfs has there
        if device.type == "usb" and device.path not in known and device.path.startswith("/sys/"):
            speed = _read(sysfs / Path(device.path).relative_to("/sys") / "speed")
            if speed is None:
                found.append(
                    Finding(
                        "usb",
                        "info",
                        f"{device.path}: link speed not readable (no {device.path}/speed)",
                    )
                )
    for t in tpus:
        where = f"{t.sysfs_path.name} ({t.vendor}:{t.product})"
        if (t.vendor, t.product) == ("1a6e", "089a"):
            found.append(Finding("usb", "info", f"{where}: USB Accelerator without firmware yet (normal until the first program opens it; libedgetpu uploads the firmware and it comes back as 18d1:9302)",
                                 "if it stays 1a6e:089a while segd runs, segd cannot write the device: " + INSTALL_RULES))  # fmt: skip
        if t.speed_mbps is None:
            found.append(Finding("usb", "info", f"{where}: link speed not readable"))
        elif t.speed_mbps >= 5000:
            found.append(Finding("usb", "ok", f"{where}: USB 3 link ({t.speed_mbps:g} Mb/s)"))
        else:
            found.append(Finding("usb", "warn", f"{where}: linked at {t.speed_mbps:g} Mb/s (USB 2 or slower): inference and model upload are several times slower",
                                 "plug it into a blue USB 3 port (Pi 4/5) with the supplied USB-C cable, directly, not through a USB 2 hub"))  # fmt: skip
        if t.node is not None:
            problem = node_access(t.node, "plugdev")
            if problem:
                found.append(Finding("usb", "warn", problem, INSTALL_RULES))
    return found


def check_pcie(sysfs: Path, dev: Path) -> list[Finding]:
    found = []
    classes = (
        sorted((sysfs / "class" / "apex").glob("apex_*"))
        if (sysfs / "class" / "apex").is_dir()
        else []
    )
    nodes = sorted(dev.glob("apex_*"))
    if not classes and not nodes:
        return [Finding("pcie", "info", f"no PCIe/M.2 Edge TPU ({dev}/apex_0 absent)")]
    for node in nodes:
        problem = node_access(node, "apex")
        if problem:
            found.append(
                Finding(
                    "pcie",
                    "warn",
                    problem,
                    f'sudo {SEGD} install-service (udev rule: SUBSYSTEM=="apex", MODE="0660", GROUP="apex"), then reboot',
                )
            )
        else:
            found.append(Finding("pcie", "ok", f"{node} is accessible to group apex"))
    if classes and not nodes:
        found.append(Finding("pcie", "warn", f"the apex driver sees {len(classes)} device(s) but {dev}/apex_* is missing",
                             "check `ls -l /dev/apex_*` and dmesg | grep apex"))  # fmt: skip
    return found


def check_devices(
    status: Any, accelerator: str, usb: list[UsbTpu], has_pcie: bool, usb_visible: bool = True
) -> list[Finding]:
    """What libedgetpu enumerates, compared with what the bus shows (``usb_visible``: this
    machine has a sysfs USB tree to look at)."""
    if not status.loadable:
        if usb or has_pcie:
            return [Finding("devices", "warn", f"an Edge TPU is attached ({len(usb)} USB, PCIe: {'yes' if has_pcie else 'no'}) but libedgetpu is not installed",
                            "install libedgetpu (see the libedgetpu line above)")]  # fmt: skip
        seen = (
            "no Coral USB Accelerator on the USB bus"
            if usb_visible
            else "no USB bus visible here (no /sys/bus/usb: a container?)"
        )
        return [Finding("devices", "info", f"{seen}, no PCIe Edge TPU")]
    if status.devices:
        listed = ", ".join(f"{d.type} {d.path}" for d in status.devices)
        return [
            Finding(
                "devices", "ok", f"libedgetpu lists {len(status.devices)} Edge TPU(s): {listed}"
            )
        ]
    level = "error" if accelerator == "edgetpu" else ("info" if accelerator == "cpu" else "warn")
    fix = ("plug the USB Accelerator into a USB 3 port; `lsusb -d 18d1:9302` or `lsusb -d 1a6e:089a` must list it. "
           "PCIe/M.2: install gasket-dkms from the Coral apt repository and reboot; /dev/apex_0 must exist")  # fmt: skip
    if usb:
        fix = f"the bus shows {len(usb)} USB Accelerator(s) that libedgetpu does not list: it cannot open them — {INSTALL_RULES}"
    return [Finding("devices", level, status.reason or "no Edge TPU found", fix)]


# --- udev, groups, service -------------------------------------------------------------------
def check_udev(dirs: Iterable[Path], accelerator: str) -> list[Finding]:
    usb_rule: Path | None = None
    apex_rule: Path | None = None
    for directory in dirs:
        for rules in sorted(directory.glob("*.rules")) if directory.is_dir() else []:
            text = _read(rules) or ""
            if usb_rule is None and "18d1" in text and ("1a6e" in text or "9302" in text):
                usb_rule = rules
            if apex_rule is None and 'SUBSYSTEM=="apex"' in text:
                apex_rule = rules
    level = "info" if accelerator == "cpu" else "warn"
    found = []
    if usb_rule:
        found.append(Finding("udev", "ok", f"USB Accelerator rule: {usb_rule}"))
    else:
        found.append(
            Finding(
                "udev",
                level,
                "no udev rule gives the USB Accelerator (18d1:9302 / 1a6e:089a) to plugdev: only root can use it",
                INSTALL_RULES,
            )
        )
    if apex_rule:
        found.append(Finding("udev", "ok", f"PCIe apex rule: {apex_rule}"))
    else:
        found.append(
            Finding(
                "udev",
                "info",
                "no udev rule for PCIe /dev/apex_* (only needed for M.2/PCIe Edge TPUs)",
                f"sudo {SEGD} install-service",
            )
        )
    return found


def check_groups(service: bool) -> list[Finding]:
    found = []
    for group in ("plugdev", "apex"):
        try:
            grp.getgrnam(group)
        except KeyError:
            if service:
                found.append(Finding("groups", "error", f"group {group} does not exist: segd.service (SupplementaryGroups=plugdev apex) fails to start with status 216/GROUP",
                                     f"sudo groupadd --system {group}   (segd install-service does it)"))  # fmt: skip
            else:
                found.append(
                    Finding(
                        "groups",
                        "info",
                        f"group {group} does not exist (segd.service needs it; segd install-service creates it)",
                    )
                )
    if os.geteuid() == 0:
        found.append(
            Finding(
                "groups",
                "info",
                "running as root: the service gets plugdev and apex through SupplementaryGroups=",
            )
        )
        return found
    user = pwd.getpwuid(os.geteuid()).pw_name
    mine = {_group_name(g).removeprefix("group ") for g in os.getgroups()}
    if "plugdev" not in mine:
        found.append(Finding("groups", "warn", f"user {user} is not in plugdev: `segd serve` run by {user} cannot open a USB Accelerator",
                             f"sudo usermod -aG plugdev {user}, then log out and back in"))  # fmt: skip
    else:
        found.append(Finding("groups", "ok", f"user {user} is in plugdev"))
    return found


def check_service(unit: Path, env_file: Path | None) -> list[Finding]:
    if not unit.is_file():
        return [
            Finding(
                "service",
                "warn",
                f"{unit} is not installed",
                f"sudo {SEGD} install-service",
            )
        ]
    found = []
    exec_line = next(
        (ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")), ""
    )
    exec_path = Path(exec_line.removeprefix("ExecStart=").split(" ")[0]) if exec_line else None
    if exec_path is None or not (exec_path.is_file() and os.access(exec_path, os.X_OK)):
        found.append(Finding("service", "error", f"{unit}: ExecStart points at {exec_path}, which is not an executable file",
                             "reinstall segd there, or run install-service again from the segd you want to run"))  # fmt: skip
    else:
        found.append(Finding("service", "ok", f"{unit} runs {exec_path}"))
    if env_file is not None and env_file.is_file():
        mode = stat.S_IMODE(env_file.stat().st_mode)
        secret = "SEGD_API_KEY=" in "\n".join(
            ln for ln in (_read(env_file) or "").splitlines() if not ln.lstrip().startswith("#")
        )
        if secret and mode & 0o004:
            found.append(
                Finding(
                    "service",
                    "warn",
                    f"{env_file} holds the API key and is world-readable (mode {mode:04o})",
                    f"sudo chmod 600 {env_file}",
                )
            )
    if Path("/run/systemd/system").is_dir():
        state = _systemctl_show()
        if state:
            level = "ok" if state.get("ActiveState") == "active" else "warn"
            found.append(Finding("service", level, f"segd.service is {state.get('ActiveState')} ({state.get('SubState')}): {state.get('StatusText') or 'no status'}",
                                 None if level == "ok" else "journalctl -u segd -b   (why it stopped); sudo systemctl enable --now segd"))  # fmt: skip
    return found


def _systemctl_show() -> dict[str, str]:
    import subprocess

    try:
        proc = subprocess.run(["systemctl", "show", "segd.service", "-p", "ActiveState,SubState,StatusText"],
                              capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


# --- models ----------------------------------------------------------------------------------
def check_models(settings: Settings, tpu_usable: bool, service: bool = False) -> list[Finding]:
    """Model files present and intact, else where they come from. ``settings`` are the
    daemon's (for the service: with /etc/segd/segd.env applied)."""
    from segd.errors import SegdError
    from segd.install import hidden_from_service
    from segd.pins import file_digests, problem
    from segd.variants import default_models_dir, load_manifest

    mdir = settings.models_dir or default_models_dir()
    try:
        manifest = load_manifest(models_dir=mdir)
    except (SegdError, OSError, ValueError) as exc:
        return [
            Finding("models", "error", f"cannot read the model manifest: {exc}", "reinstall segd")
        ]
    names, _ = settings.served_models(manifest)
    mirror = settings.mirror
    found: list[Finding] = []
    if service:
        # ProtectHome=yes: /home, /root and /run/user are empty to the service. A mirror or
        # models dir there gives "Permission denied" and a unit that never gets ready.
        for what, where in (("SEGD_MODEL_MIRROR", mirror), ("SEGD_MODELS_DIR", str(mdir))):
            hidden = hidden_from_service(where) if where and where.startswith("/") else None
            if hidden is not None:
                found.append(Finding("models", "error", f"{what}={where} is under {hidden}, which segd.service cannot see (ProtectHome=yes): it cannot read model files there and never gets ready",
                                     f"move it out of {hidden}, e.g. sudo cp -r {where} /srv/segd-models, and set {what}=/srv/segd-models in {SERVICE_ENV_FILE}"))  # fmt: skip
    if not mdir.is_dir():
        found.append(
            Finding(
                "models",
                "info",
                f"models directory {mdir} does not exist yet (created on the first pull)",
            )
        )
    for name in names:
        if name not in manifest.variants:
            found.append(Finding("models", "error", f"SEGD_MODELS names {name!r}, which is not in the manifest (known: {', '.join(manifest.variants)})",
                                 "fix SEGD_MODELS; `segd models list` shows the variants"))  # fmt: skip
            continue
        variant = manifest.variants[name]
        try:
            cpu_spec = variant.cpu_variant().cpu
        except SegdError as exc:
            found.append(Finding("models", "error", f"{name}: {exc.detail}", "fix the manifest"))
            continue
        assert cpu_spec is not None
        specs = [(cpu_spec, True)]
        if variant.edgetpu is not None and settings.accelerator != "cpu":
            specs.append((variant.edgetpu, tpu_usable or settings.accelerator == "edgetpu"))
        for spec, needed in specs:
            path = mdir / spec.name
            drive = f"Google Drive (file {spec.gdrive_id})" if spec.gdrive_id else None
            source = mirror or spec.url or drive or "nowhere"
            if not path.is_file():
                level = "warn" if needed else "info"
                if not (mirror or spec.url or drive):
                    level = "error" if needed else "info"
                what = "" if needed else " (only used with an Edge TPU)"
                found.append(Finding("models", level, f"{name}: {spec.name} is not in {mdir}{what}; segd fetches it at start-up from {source}",
                                     f"to fetch it now: {SEGD} models pull {name} --models-dir {mdir}"))  # fmt: skip
                continue
            try:
                digest, md5 = file_digests(path)
            except OSError as exc:
                found.append(
                    Finding(
                        "models",
                        "error",
                        f"{name}: cannot read {path}: {exc.strerror}",
                        f"check the permissions of {mdir}",
                    )
                )
                continue
            if spec.sha256:
                wrong = None if digest == spec.sha256 else (
                    f"{path} has sha256 {digest[:16]}…, the manifest says {spec.sha256[:16]}… (corrupt or replaced)")
            else:
                wrong = problem(spec, mdir, digest, md5)
            if wrong is not None:
                found.append(Finding("models", "error", f"{name}: {wrong}; segd refuses to load it",
                                     f"{SEGD} models pull {name} --force --models-dir {mdir}"))  # fmt: skip
            else:
                found.append(
                    Finding(
                        "models",
                        "ok",
                        f"{name}: {spec.name} present, sha256 {digest[:12]}… matches"
                        + ("" if spec.sha256 else " (its pin, or the publisher's md5)"),
                    )
                )
    others = [n for n in manifest.variants if n not in names]
    if others:
        present = [n for n in others if all((mdir / f.name).is_file() for f in manifest.variants[n].files())]
        found.append(
            Finding(
                "models",
                "info",
                f"not served: {', '.join(others)} ({len(present)} of them downloaded)",
            )
        )
    return found


# --- all together ----------------------------------------------------------------------------
def check_sources(settings: Settings, ffmpeg: str | None, paho: bool) -> list[Finding]:
    """Cameras and MQTT from the settings file: what they need on this machine (``ffmpeg`` on
    PATH for RTSP cameras, paho-mqtt for [mqtt])."""
    found: list[Finding] = []
    rtsp = [n for n, src in settings.sources.items() if src.kind == "rtsp"]
    if rtsp:
        if ffmpeg is None:
            found.append(Finding("sources", "error", f"RTSP cameras ({', '.join(rtsp)}) are read by ffmpeg, which is not installed",
                                 "sudo apt-get install -y ffmpeg"))  # fmt: skip
        else:
            found.append(Finding("sources", "ok", f"ffmpeg for RTSP cameras ({', '.join(rtsp)}): {ffmpeg}"))
    elif settings.sources:
        found.append(Finding("sources", "ok", f"cameras: {', '.join(settings.sources)}"))
    if settings.mqtt is not None:
        if paho:
            found.append(Finding("mqtt", "ok", f"MQTT broker {settings.mqtt.host}:{settings.mqtt.port} (paho-mqtt installed)"))
        else:
            found.append(Finding("mqtt", "error", "[mqtt] is configured but paho-mqtt is not installed",
                                 f"sudo {sys.executable} -m pip install 'paho-mqtt>=2.0'  (the segd[mqtt] extra)"))  # fmt: skip
    return found


def run_checks(machine: MachinePaths) -> list[Finding]:
    from segd.errors import RuntimeUnavailable
    from segd.runtime import edgetpu
    from segd.runtime.cpu import available_runtimes, runtime_module

    s = machine.settings
    findings = check_python()
    status = edgetpu.library_status(machine.library)
    versions = available_runtimes()
    try:
        chosen: str | None = runtime_module(s.runtime)[0]
    except RuntimeUnavailable:
        chosen = None
    findings += check_runtime(versions, chosen)
    findings += check_libedgetpu(
        status, s.accelerator, dpkg_packages(machine.dpkg_status), s.edgetpu_library
    )
    findings += _pairing_findings(machine, status)
    usb = usb_tpus(machine.sysfs, machine.dev)
    pcie = check_pcie(machine.sysfs, machine.dev)
    usb_visible = (machine.sysfs / "bus" / "usb" / "devices").is_dir()
    findings += check_devices(
        status, s.accelerator, usb, any(f.level != "info" for f in pcie), usb_visible
    )
    findings += check_usb(machine.sysfs, machine.dev, list(status.devices))
    findings += pcie
    findings += check_udev(machine.udev_dirs, s.accelerator)
    findings += check_groups(machine.service)
    if machine.service:
        findings += check_service(machine.unit, machine.env_file)
    findings += check_models(s, status.available and s.accelerator != "cpu", machine.service)
    findings += check_sources(s, shutil.which("ffmpeg"), importlib.util.find_spec("paho") is not None)
    return findings


def _pairing_findings(machine: MachinePaths, status: Any) -> list[Finding]:
    from segd.runtime import edgetpu, pairing

    s = machine.settings
    python = s.edgetpu_python if s.tpu_isolation else None
    try:
        worker = worker_environment(python)
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        return [Finding("pairing", "error" if s.accelerator == "edgetpu" else "warn",
                        f"the Edge TPU worker's Python {python} does not run: {exc}",
                        f"point SEGD_EDGETPU_PYTHON at a Python with numpy and a TFLite runtime, or:\n{known_good_commands()}")]  # fmt: skip
    if not status.loadable:
        return check_pairing(None, s.accelerator, worker)
    try:
        table = pairing.Table.load(s.edgetpu_pairings)
    except ValueError as exc:
        return [Finding("pairing", "error", str(exc), "fix or remove SEGD_EDGETPU_PAIRINGS")]
    lib = edgetpu.observe_library(machine.library, admindir=machine.dpkg_status.parent, table=table)
    decision = pairing.decide(lib, worker["runtimes"], table=table, policy=s.edgetpu_pairing, preferred=s.runtime)
    return check_pairing(decision, s.accelerator, worker)


def exit_code(findings: Iterable[Finding]) -> int:
    return 1 if any(f.level == "error" for f in findings) else 0


def format_report(findings: list[Finding], header: str = "") -> str:
    marks = {"ok": " ok ", "info": "info", "warn": "WARN", "error": "FAIL"}
    lines = [header] if header else []
    for f in findings:
        lines.append(f"[{marks[f.level]}] {f.check:<10} {f.message}")
        if f.fix and f.level != "ok":
            label = "hint:" if f.level == "info" else "fix: "
            fix_lines = f.fix.splitlines()
            lines.append(f"{'':18}{label} {fix_lines[0]}")
            lines.extend(f"{'':24}{line}" for line in fix_lines[1:])
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    if errors:
        verdict = f"{errors} error(s), {warnings} warning(s): segd cannot serve as configured until the errors are fixed"
    elif warnings:
        verdict = f"no errors, {warnings} warning(s): segd can serve (see the warnings for what it falls back to)"
    else:
        verdict = "no problems found"
    lines.append(verdict)
    return "\n".join(lines)


def read_env_file(path: Path) -> dict[str, str]:
    """A systemd ``EnvironmentFile``: KEY=value lines, # and ; comments, optional quotes."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service", action="store_true",
                   help=f"check the installed service: its settings ({SERVICE_ENV_FILE}), models dir ({SERVICE_MODELS_DIR}) and unit")  # fmt: skip
    p.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="read SEGD_* settings from this file (systemd EnvironmentFile syntax)",
    )
    p.add_argument("--config", type=Path, default=None, help="TOML settings file (SEGD_CONFIG)")
    p.add_argument(
        "--models-dir", type=Path, default=None, help="models directory (SEGD_MODELS_DIR)"
    )
    p.add_argument(
        "--accelerator",
        choices=ACCELERATORS,
        default=None,
        help="check for this accelerator setting (SEGD_ACCELERATOR)",
    )
    p.add_argument("--json", action="store_true", help="findings as JSON")


def run(args: argparse.Namespace) -> int:
    from segd import __version__
    from segd.runtime import edgetpu
    from segd.settings import load_settings

    env = environment()
    env_file = args.env_file
    if args.service:
        env.setdefault("SEGD_MODELS_DIR", SERVICE_MODELS_DIR)
        env["SEGD_MODELS_DIR"] = SERVICE_MODELS_DIR
        env_file = env_file or SERVICE_ENV_FILE
    if env_file is not None:
        try:
            env.update(read_env_file(env_file))
        except OSError as exc:
            if not (args.service and args.env_file is None and isinstance(exc, FileNotFoundError)):
                print(f"segd doctor: cannot read {env_file}: {exc.strerror}", file=sys.stderr)
                return 2
    config = args.config or config_path(env)
    try:
        settings = load_settings(
            config,
            env=env,
            overrides={"models_dir": args.models_dir, "accelerator": args.accelerator},
        )
    except ValueError as exc:
        print(f"segd doctor: {exc}", file=sys.stderr)
        return 2
    machine = MachinePaths(settings, settings.edgetpu_library or edgetpu.DEFAULT_LIBRARY,
                  service=args.service, env_file=env_file, env=env)  # fmt: skip
    findings = run_checks(machine)
    if args.json:
        print(
            json.dumps(
                {"findings": [asdict(f) for f in findings], "exit_code": exit_code(findings)},
                indent=2,
            )
        )
    else:
        header = f"segd doctor — segd {__version__}, {platform.system()} {platform.machine()}, accelerator={settings.accelerator}"
        print(format_report(findings, header))
    return exit_code(findings)
