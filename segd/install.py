"""``segd install-service``: put the systemd unit, its settings file and the Coral udev rules in
place, for the segd installation it runs from.

The files are the ones in the repository's ``systemd/`` directory (shipped in the wheel as
``segd/data/*``); the only thing written into them is the ``ExecStart=`` path of this segd, so
what ``systemd-analyze verify`` checked is what gets installed. ``--root DIR`` installs under
DIR (packaging, tests) and then runs no system commands; ``--dry-run`` only prints the plan.
"""

from __future__ import annotations

import argparse
import grp
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from segd.errors import InstallError
from segd.fsutil import atomic_write

DATA_DIR = Path(__file__).resolve().parent / "data"
UNIT_NAME = "segd.service"
ENV_NAME = "segd.env"
RULES_NAME = "99-coral-edgetpu.rules"
DEFAULT_EXEC = "/opt/segd/bin/segd"
SYSTEM_UNIT_DIR = "etc/systemd/system"
SYSTEM_ENV_DIR = "etc/segd"
UDEV_DIR = "etc/udev/rules.d"
DEVICE_GROUPS = ("plugdev", "apex")

# Directives a per-user systemd instance cannot apply (they need privileges, a system user or
# system targets); `--user` drops them and keeps the seccomp- and cgroup-based ones.
SYSTEM_ONLY = {
    "Wants", "After", "DynamicUser", "SupplementaryGroups", "StateDirectory", "StateDirectoryMode",
    "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem", "ProtectHome", "PrivateTmp",
    "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc", "RemoveIPC",
    "PrivateDevices", "DevicePolicy", "DeviceAllow",
}  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One thing install-service does: create a directory, write a file, keep a file the admin
    already has, or run a command."""

    action: str  # mkdir | write | keep | run | skip
    target: str
    content: str | None = None
    mode: int | None = None
    note: str = ""

    def describe(self, dry_run: bool) -> str:
        verb = {"mkdir": "create", "write": "write", "keep": "keep", "run": "run", "skip": "skip"}[
            self.action
        ]
        if dry_run and self.action in ("mkdir", "write", "run"):
            verb = "would " + verb
        mode = f" (mode {self.mode:04o})" if self.mode is not None and self.action != "run" else ""
        note = f" — {self.note}" if self.note else ""
        return f"{verb} {self.target}{mode}{note}"


def data_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise InstallError(f"{path} is missing from this segd installation (reinstall segd)")
    return path


def render_unit(template: str, exec_path: str) -> str:
    """The unit with ``ExecStart=`` pointing at ``exec_path`` — the one change install makes."""
    pattern = re.compile(r"^ExecStart=(\S+)(.*)$", re.MULTILINE)
    found = pattern.findall(template)
    if len(found) != 1:
        raise InstallError(
            f"the unit template must have exactly one ExecStart=, found {len(found)}"
        )
    return pattern.sub(lambda m: f"ExecStart={exec_path}{m.group(2)}", template)


def user_unit(system_unit: str) -> str:
    """The system unit as a per-user unit: settings in ``~/.config/segd/segd.env``, models in
    segd's per-user default directory, device access through the user's own groups."""
    out = []
    for line in system_unit.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            key = key.strip()
            if key in SYSTEM_ONLY:
                continue
            if key == "Environment" and value.startswith("SEGD_MODELS_DIR="):
                continue
            if key == "EnvironmentFile":
                line = "EnvironmentFile=-%h/.config/segd/segd.env"
            if key == "WantedBy":
                line = "WantedBy=default.target"
        out.append(line)
    return "\n".join(out) + "\n"


def default_exec() -> str:
    """The ``segd`` script of the installation running this code (a venv's ``bin/segd``)."""
    candidate = Path(sys.prefix) / "bin" / "segd"
    return str(candidate) if candidate.exists() else DEFAULT_EXEC


def _under(root: Path, absolute: str | Path) -> Path:
    return root / str(absolute).lstrip("/")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def systemd_running() -> bool:
    """systemd is PID 1 here (not a chroot, an image build or a container without systemd)."""
    return Path("/run/systemd/system").is_dir()


def udev_running() -> bool:
    """udevd runs here (containers and chroots have no udevadm or no daemon to reload)."""
    return shutil.which("udevadm") is not None and Path("/run/udev/control").exists()


def hidden_from_service(path: str | Path) -> str | None:
    """The directory (/home, /root, /run/user) that hides ``path`` from the sandboxed service
    (ProtectHome=yes), or None when the service can see it."""
    text = str(path)
    for hidden in ("/home", "/root", "/run/user"):
        if text == hidden or text.startswith(hidden + "/"):
            return hidden
    return None


def plan(
    root: Path,
    exec_path: str,
    *,
    user: bool = False,
    udev: bool = True,
    home: Path | None = None,
    edgetpu_pair: bool = False,
    machine: str | None = None,
    systemd_live: bool | None = None,
    udev_live: bool | None = None,
) -> list[Step]:
    """What installing means, as steps; nothing is touched here. ``edgetpu_pair``: also install
    the known-good libedgetpu/TFLite pair (segd/data/edgetpu_pairings.toml) and point the
    settings at its Python. Commands for a udev or systemd that is not running here (containers,
    chroots, image builds) become skipped steps: the files are all that is needed, and both read
    them when they start."""
    from segd.runtime import pairing

    system = str(root) == "/"
    systemd_live = systemd_running() if systemd_live is None else systemd_live
    udev_live = udev_running() if udev_live is None else udev_live
    if system and not user:
        check_exec(exec_path)
    unit = render_unit(data_file(UNIT_NAME).read_text(), exec_path)
    env = data_file(ENV_NAME).read_text()
    steps: list[Step] = []
    pair_steps: list[list[str]] = []
    tpu_python = f"{pairing.TPU_VENV}/bin/python"
    if edgetpu_pair and user:
        raise InstallError("--edgetpu-pair installs a system package: run it with sudo, without --user")
    if edgetpu_pair:
        rec = pairing.Table.load().recommended
        pair_steps = pairing.install_steps(rec, machine)
        if not pair_steps:
            raise InstallError(pairing.install_advice(rec, machine))
    if edgetpu_pair or _under(root, tpu_python).exists():
        env = env.replace(f"#SEGD_EDGETPU_PYTHON={tpu_python}", f"SEGD_EDGETPU_PYTHON={tpu_python}")
    if user:
        home = home or Path.home()
        unit_dir = _under(root, home / ".config" / "systemd" / "user")
        env_dir = _under(root, home / ".config" / "segd")
        unit = user_unit(unit)
    else:
        unit_dir = root / SYSTEM_UNIT_DIR
        env_dir = root / SYSTEM_ENV_DIR
    for directory in (env_dir, unit_dir):
        if not directory.is_dir():
            steps.append(Step("mkdir", str(directory), mode=0o755))
    env_path = env_dir / ENV_NAME
    if env_path.exists():
        note = "already there; your settings are not touched"
        if edgetpu_pair and "\nSEGD_EDGETPU_PYTHON=" not in "\n" + env_path.read_text():
            note += f" — add SEGD_EDGETPU_PYTHON={tpu_python} to it"
        steps.append(Step("keep", str(env_path), note=note))
    else:
        steps.append(Step("write", str(env_path), env, 0o600, "settings (may hold the API key)"))
    unit_path = unit_dir / UNIT_NAME
    unit_note = f"ExecStart={exec_path} serve"
    if unit_path.exists() and unit_path.read_text() == unit:
        steps.append(Step("keep", str(unit_path), note="unchanged"))
    else:
        steps.append(Step("write", str(unit_path), unit, 0o644, unit_note))
    if udev and not user:
        rules_dir = root / UDEV_DIR
        if not rules_dir.is_dir():
            steps.append(Step("mkdir", str(rules_dir), mode=0o755))
        steps.append(Step("write", str(rules_dir / RULES_NAME), data_file(RULES_NAME).read_text(), 0o644,
                          "Coral USB (1a6e:089a, 18d1:9302) -> plugdev, PCIe apex -> apex"))  # fmt: skip
    commands: list[list[str]] = list(pair_steps)
    if user:
        commands.append(["systemctl", "--user", "daemon-reload"])
    else:
        for group in DEVICE_GROUPS:
            if not _group_exists(group):
                commands.append(["groupadd", "--system", group])
        if udev:
            commands.append(["udevadm", "control", "--reload-rules"])
            commands.append(
                [
                    "udevadm",
                    "trigger",
                    "--action=add",
                    "--subsystem-match=usb",
                    "--subsystem-match=apex",
                ]
            )
        commands.append(["systemctl", "daemon-reload"])
    for cmd in commands:
        if not system:
            steps.append(Step("skip", shlex.join(cmd), note=f"not run: installing under {root}"))
        elif cmd[0] == "udevadm" and not udev_live:
            steps.append(Step("skip", shlex.join(cmd), note="udev is not running here (container or chroot): the rules apply where udev reads them, at its next start"))  # fmt: skip
        elif cmd[:2] == ["systemctl", "daemon-reload"] and not systemd_live:
            steps.append(Step("skip", shlex.join(cmd), note="systemd is not running here (chroot or image build): it reads the unit when it boots"))  # fmt: skip
        else:
            steps.append(Step("run", shlex.join(cmd)))
    return steps


def check_exec(exec_path: str) -> None:
    path = Path(exec_path)
    if not path.is_absolute():
        raise InstallError(f"ExecStart needs an absolute path, not {exec_path!r}")
    hidden = hidden_from_service(exec_path)
    if hidden is not None:
        raise InstallError(
            f"{exec_path} is under {hidden}, which the service cannot see (ProtectHome=yes); "
            f"install segd in a venv outside it, e.g. sudo python3 -m venv /opt/segd && "
            f"sudo /opt/segd/bin/pip install <segd checkout>, then run "
            f"sudo /opt/segd/bin/segd install-service"
        )
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise InstallError(f"{exec_path} is not an executable file; pass --prefix or --exec")


def apply(steps: list[Step], *, dry_run: bool = False, out: TextIO | None = None) -> int:
    """Carry the steps out (or only print them). Returns the number of failed commands."""
    stream = out if out is not None else sys.stdout
    failures = 0
    for step in steps:
        print(step.describe(dry_run), file=stream)
        if dry_run:
            continue
        if step.action == "mkdir":
            Path(step.target).mkdir(parents=True, exist_ok=True)
            if step.mode is not None:
                os.chmod(step.target, step.mode)
        elif step.action == "write":
            atomic_write(Path(step.target), step.content or "", mode=step.mode or 0o644)
        elif step.action == "run":
            argv = shlex.split(step.target)
            if shutil.which(argv[0]) is None:
                print(f"  {argv[0]} not found; run it yourself later", file=stream)
                failures += 1
                continue
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                failures += 1
                print(f"  failed ({proc.returncode}): {proc.stderr.strip()}", file=stream)
    return failures


def next_steps(user: bool, root: Path, exec_path: str = DEFAULT_EXEC) -> str:
    where = "~/.config/segd/segd.env" if user else "/etc/segd/segd.env"
    ctl = "systemctl --user" if user else "sudo systemctl"
    lines = [
        "",
        "next:",
        f"  1. review {where} (host, port, API key, models)",
        f"  2. {ctl} enable --now segd     # returns once the models are loaded and warmed up",
        f"  3. {ctl} status segd            # the Status: line names each model's backend",
        f"  4. {'' if user else 'sudo '}{exec_path} doctor{'' if user else ' --service'}   # what is missing, and what to do",
    ]
    if user:
        lines.append("  to start it at boot without logging in: sudo loginctl enable-linger $USER")
        lines.append(
            f"  udev rules for the Coral need root: sudo install -m 644 {data_file(RULES_NAME)} /etc/udev/rules.d/"
        )
    if str(root) != "/":
        lines.insert(1, f"(installed under {root}; no system command was run)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install under this directory (default /); runs no system commands unless it is /",
    )
    p.add_argument(
        "--prefix",
        type=Path,
        default=None,
        help="the venv segd is installed in: ExecStart=PREFIX/bin/segd (default: this one)",
    )
    p.add_argument(
        "--exec",
        dest="exec_path",
        default=None,
        help="full path of the segd executable for ExecStart (overrides --prefix)",
    )
    p.add_argument(
        "--user",
        action="store_true",
        help="install a per-user unit (~/.config/systemd/user) instead of a system service",
    )
    p.add_argument(
        "--no-udev", dest="udev", action="store_false", help="do not install the Coral udev rules"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be done and change nothing"
    )
    p.add_argument(
        "--edgetpu-pair",
        action="store_true",
        help="also install the known-good libedgetpu + tflite_runtime pair (docs/RASPBERRY_PI.md step 1) "
        "and set SEGD_EDGETPU_PYTHON",
    )


def run(args: argparse.Namespace) -> int:
    root: Path = args.root
    if args.exec_path:
        exec_path = args.exec_path
    elif args.prefix is not None:
        exec_path = str(Path(args.prefix) / "bin" / "segd")
    else:
        exec_path = default_exec()
    if str(root) == "/" and not args.user and not args.dry_run and os.geteuid() != 0:
        print("segd install-service: needs root to write /etc (run it with sudo, or --dry-run to see the plan)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        steps = plan(root, exec_path, user=args.user, udev=args.udev, edgetpu_pair=args.edgetpu_pair)
    except InstallError as exc:
        print(f"segd install-service: {exc}", file=sys.stderr)
        return 2
    failures = apply(steps, dry_run=args.dry_run)
    if not args.dry_run:
        print(next_steps(args.user, root, exec_path))
    return 1 if failures else 0
