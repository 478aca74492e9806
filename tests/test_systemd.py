"""segd under systemd: the notify/watchdog protocol over a real AF_UNIX datagram socket with the
real daemon, and the unit file checked by systemd's own tools (``systemd-analyze``)."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemon import Daemon, start_daemon

from segd.app.systemd import Notifier, watchdog_interval
from segd.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "segd.service"
ENV_FILE = REPO / "systemd" / "segd.env"
RULES = REPO / "systemd" / "99-coral-edgetpu.rules"
DM05 = "deeplabv3_mnv2_dm05_pascal"
WATCHDOG_USEC = 300_000  # 0.3 s: segd pings every 0.1 s


# --- a systemd stand-in for the notify socket: only the socket, the protocol is segd's ---------
class NotifySocket:
    """Listens where ``NOTIFY_SOCKET`` points and timestamps every datagram, like PID 1 does."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        assert len(self.path) < 100, self.path  # sun_path limit
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            stamp = time.monotonic()
            with self.lock:
                for line in data.decode().split("\n"):
                    self.messages.append((stamp, line))

    def lines(self, prefix: str = "") -> list[tuple[float, str]]:
        with self.lock:
            return [(t, m) for t, m in self.messages if m.startswith(prefix)]

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [t for t, m in self.lines() if m == line]
            if found:
                return found[0]
            time.sleep(0.01)
        raise TimeoutError(f"no {line!r} within {timeout} s; got {self.lines()}")

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to 107 bytes and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="segd-notify-") as tmp:
        listener = NotifySocket(Path(tmp))
        yield listener
        listener.close()


def notify_env(listener: NotifySocket, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "SEGD_TEST_HOOKS": "1", **extra}  # fmt: skip


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


# --- the protocol, end to end --------------------------------------------------------------------
def test_ready_only_after_warm_up_then_watchdog_pings_that_stop_while_the_loop_is_wedged(
    tmp_path: Path, gated_mirror: tuple[str, threading.Event], notify_socket: NotifySocket
) -> None:
    url, gate = gated_mirror
    empty = tmp_path / "models"
    empty.mkdir()
    d = start_daemon(tmp_path, empty, "--model", DM05, "--accelerator", "cpu", "--mirror", url,
                     env=notify_env(notify_socket), wait="healthy")  # fmt: skip
    try:
        # Loading is held at the gate: the HTTP server answers, the service is not ready, and
        # systemd has been told only that models are loading.
        time.sleep(1.0)
        assert httpx.get(d.url + "/readyz").status_code == 503
        assert notify_socket.lines("READY=1") == []
        assert notify_socket.lines("WATCHDOG=1") == []
        assert any("loading models" in m for _, m in notify_socket.lines("STATUS="))

        gate_opened = time.monotonic()
        gate.set()
        ready_at = notify_socket.wait_for("READY=1", timeout=60)
        assert ready_at > gate_opened
        assert httpx.get(d.url + "/readyz").status_code == 200  # READY=1 implies /readyz is 200
        assert f"STATUS=serving {DM05}=cpu" in [m for _, m in notify_socket.lines("STATUS=")]

        # Healthy: pings every WATCHDOG_USEC/3, none before READY=1, never a gap systemd would
        # count as a missed watchdog.
        time.sleep(1.5)
        pings = [t for t, _ in notify_socket.lines("WATCHDOG=1")]
        assert pings and min(pings) >= ready_at
        assert len(pings) >= 8, pings
        assert max(gaps(pings)) < WATCHDOG_USEC / 1e6, gaps(pings)

        # Wedge the event loop for 1.5 s: no pings while it is blocked, then they resume.
        before = len(pings)
        t0 = time.monotonic()
        r = httpx.post(d.url + "/debug/wedge", params={"seconds": 1.5}, timeout=10)
        t1 = time.monotonic()
        assert r.status_code == 200 and r.json()["blocked_seconds"] >= 1.5
        time.sleep(0.6)
        pings = [t for t, _ in notify_socket.lines("WATCHDOG=1")]
        during = [t for t in pings if t0 + 0.15 < t < t1 - 0.15]
        assert during == [], during
        stalls = [g for g in gaps(pings[before - 1 :]) if g > WATCHDOG_USEC / 1e6]
        assert len(stalls) == 1 and stalls[0] >= 1.4, gaps(pings[before - 1 :])
        assert len([t for t in pings if t > t1]) >= 3  # the loop is back, so are the pings
    finally:
        code = d.stop()
    assert code == 0
    assert notify_socket.lines("STOPPING=1"), notify_socket.lines()


def test_a_model_that_cannot_load_never_reports_ready_and_status_says_why(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "deeplabv3_mnv2_dm05_pascal_quant.tflite").write_bytes(b"not the model")
    d = start_daemon(tmp_path, models, "--model", DM05, "--accelerator", "cpu",
                     env=notify_env(notify_socket), wait="healthy")  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not any("failed" in m for _, m in notify_socket.lines("STATUS=")):
            assert time.monotonic() < deadline, notify_socket.lines()
            time.sleep(0.05)
        time.sleep(0.5)
        status = [m for _, m in notify_socket.lines("STATUS=")][-1]
        assert status.startswith(f"STATUS=not ready: {DM05}=failed (")
        assert (
            "sha256" in status and "segd models pull --force" in status and "segd doctor" in status
        )
        assert notify_socket.lines("READY=1") == []
        assert notify_socket.lines("WATCHDOG=1") == []
        assert httpx.get(d.url + "/readyz").status_code == 503
    finally:
        d.stop()


def test_a_failed_model_is_reported_but_the_healthy_one_still_gets_ready_and_watchdog(
    tmp_path: Path, notify_socket: NotifySocket, models_dir: Path, test_data: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    good = "deeplabv3_mnv2_pascal_quant.tflite"
    (models / good).write_bytes((models_dir / good).read_bytes())
    (models / "deeplabv3_mnv2_dm05_pascal_quant.tflite").write_bytes(b"not the model")
    d = start_daemon(tmp_path, models, "--model", "deeplabv3_mnv2_pascal", "--model", DM05,
                     "--accelerator", "cpu", env=notify_env(notify_socket), wait="healthy")  # fmt: skip
    try:
        notify_socket.wait_for("READY=1", 60)
        time.sleep(1.0)
        status = [m for _, m in notify_socket.lines("STATUS=")][-1]
        assert "deeplabv3_mnv2_pascal=cpu" in status and f"{DM05}=failed (" in status
        assert len(notify_socket.lines("WATCHDOG=1")) >= 5  # serving: no restart loop
        assert httpx.get(d.url + "/readyz").status_code == 503  # /readyz still says not all loaded
        r = httpx.post(d.url + "/segment", content=(test_data / "bird.bmp").read_bytes(),
                       headers={"content-type": "image/bmp"}, timeout=60)  # fmt: skip
        assert r.status_code == 200  # the healthy (default) model answers
    finally:
        d.stop()


def test_no_notify_socket_means_no_notifier_and_the_debug_routes_need_test_hooks(
    tmp_path: Path, models_dir: Path
) -> None:
    assert Notifier.from_env({}) is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "relative/path"}) is None
    d: Daemon = start_daemon(tmp_path, models_dir, "--model", DM05, "--accelerator", "cpu")
    try:
        assert httpx.post(d.url + "/debug/wedge", params={"seconds": 0.1}).status_code == 404
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 30_000_000),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_honoured_only_for_this_process(
    env: dict[str, str], expected: int | None
) -> None:
    assert watchdog_interval(env, 1234) == expected


def test_abstract_notify_socket_names_are_supported() -> None:
    name = f"segd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        assert notifier.send("STATUS=hello")
        assert listener.recv(100) == b"STATUS=hello"
        notifier.close()


# --- the unit file, checked by systemd's own tools ------------------------------------------------
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail(
            "systemd-analyze is not installed (Debian: apt-get install systemd); scripts/setup test installs it"
        )
    return tool


def installed_unit(tmp_path: Path) -> Path:
    """The unit as install-service writes it: ExecStart= is this test run's segd, which exists."""
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "segd", "install-service", "--root", str(root), "--no-udev",
                           "--prefix", sys.prefix], capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "etc" / "systemd" / "system" / "segd.service"


def verify(
    unit: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # verify exits 0 even for unknown keys or unparsable values ("..., ignoring"): only silence
    # is a pass. --man=no: Documentation= pages are not looked up (no man-db in CI images).
    return subprocess.run([systemd_analyze(), *extra, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False, env=env)  # fmt: skip


def test_installed_unit_passes_systemd_analyze_verify_silently(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    template = UNIT.read_text()
    assert unit.read_text() == template.replace(
        "ExecStart=/opt/segd/bin/segd serve", f"ExecStart={sys.prefix}/bin/segd serve"
    )
    proc = verify(unit)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_verify_would_catch_a_broken_directive(tmp_path: Path) -> None:
    """The check above means something: the same unit with one bad value is reported."""
    unit = installed_unit(tmp_path)
    unit.write_text(unit.read_text().replace("DevicePolicy=closed", "DevicePolicy=shut"))
    proc = verify(unit)
    assert "Failed to parse device policy" in proc.stderr


def test_user_unit_passes_verify_in_a_user_manager(tmp_path: Path) -> None:
    from segd.install import render_unit, user_unit

    unit = tmp_path / "segd.service"
    unit.write_text(user_unit(render_unit(UNIT.read_text(), f"{sys.prefix}/bin/segd")))
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    proc = verify(
        unit, "--user", env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    text = unit.read_text()
    assert (
        "DynamicUser" not in text
        and "DeviceAllow" not in text
        and "WantedBy=default.target" in text
    )
    assert "Type=notify" in text and "WatchdogSec=30" in text and "NoNewPrivileges=yes" in text


def test_unit_exposure_score_stays_low(tmp_path: Path) -> None:
    """systemd's own sandbox score (0 = locked down, 10 = fully exposed); segd needs network,
    USB/PCIe devices and the host /dev, so it can't reach 0, but everything else is closed."""
    unit = installed_unit(tmp_path)
    proc = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    match = re.search(r"Overall exposure level for segd\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def unit_settings(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_is_a_supervised_notify_service_with_device_access_and_a_sandbox() -> None:
    u = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in u.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert (
        one["Restart"] == "on-failure"
        and int(one["StartLimitBurst"]) > 1
        and int(one["StartLimitIntervalSec"]) > 0
    )
    assert one["ExecStart"] == "/opt/segd/bin/segd serve"
    assert one["EnvironmentFile"] == "-/etc/segd/segd.env"
    # Where pulled models go is the unit's own state directory.
    assert (
        one["StateDirectory"] == "segd"
        and "SEGD_MODELS_DIR=/var/lib/segd/models" in u["Environment"]
    )
    # Devices: the groups udev gives the Coral devices, the device classes allowed, and no private
    # /dev (it would hide /dev/bus/usb) or user namespace (it would unmap plugdev/apex).
    assert one["DynamicUser"] == "yes" and set(one["SupplementaryGroups"].split()) == {
        "plugdev",
        "apex",
    }
    assert one["DevicePolicy"] == "closed"
    assert set(u["DeviceAllow"]) == {"char-usb_device rw", "char-apex rw"}
    assert one.get("PrivateDevices", "no") == "no" and "PrivateUsers" not in u
    # libusb's hotplug monitor needs netlink; nothing exotic beyond that.
    assert set(one["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():  # fmt: skip
        assert one[key] == value, key
    assert "MemoryMax" in one


def test_unit_timeouts_fit_the_daemon_defaults() -> None:
    one = {k: v[-1] for k, v in unit_settings(UNIT.read_text()).items()}
    defaults = Settings()
    # systemd must not SIGKILL a drain in progress, and the watchdog period segd derives
    # (WatchdogSec/3) must be far above the event loop's normal latency.
    assert int(one["TimeoutStopSec"]) > defaults.graceful_timeout
    assert one["KillMode"] == "mixed"
    assert int(one["WatchdogSec"]) >= 10 and defaults.watchdog
    assert int(one["TimeoutStartSec"]) >= 60


# --- the settings file --------------------------------------------------------------------------
def env_lines(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(active settings, commented-out examples) of an EnvironmentFile."""
    active, examples = {}, {}
    for line in text.splitlines():
        m = re.fullmatch(r"(#?)(SEGD_[A-Z_]+)=(.*)", line.strip())
        if m:
            (examples if m.group(1) else active)[m.group(2)] = m.group(3)
    return active, examples


def test_every_setting_in_the_env_file_is_one_segd_reads_and_the_file_loads() -> None:
    active, examples = env_lines(ENV_FILE.read_text())
    assert active and examples
    known = {"SEGD_" + name.upper() for name in Settings.__dataclass_fields__} | {
        "SEGD_MODEL_MIRROR"
    }
    assert set(active) | set(examples) <= known, (set(active) | set(examples)) - known
    settings = load_settings(env=active)
    assert (settings.host, settings.port, settings.accelerator) == ("127.0.0.1", 8080, "auto")
    for key, value in examples.items():  # each example, uncommented, is a valid setting too
        load_settings(env={**active, key: value, "SEGD_INSECURE": "1"})


# --- udev rules -----------------------------------------------------------------------------------
UDEV_PAIR = re.compile(r'\s*([A-Z]+(?:\{[^}]+\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*')
UDEV_MATCH_KEYS = {"SUBSYSTEM", "ENV", "ATTR", "ATTRS", "KERNEL", "ACTION"}
UDEV_ASSIGN_KEYS = {"MODE", "GROUP", "OWNER", "TAG", "ENV"}


def parse_udev_rules(text: str) -> list[list[tuple[str, str, str]]]:
    """udev's rule syntax: comma-separated KEY[{attr}] OP "value"; match keys use ==/!=."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pairs = []
        for part in line.split(","):
            m = UDEV_PAIR.fullmatch(part)
            assert m, f'line {number}: not KEY OP "value": {part!r}'
            key, op, value = m.groups()
            base = key.split("{")[0]
            if op in ("==", "!="):
                assert base in UDEV_MATCH_KEYS, f"line {number}: {key} is not a match key"
            else:
                assert base in UDEV_ASSIGN_KEYS, f"line {number}: {key} cannot be assigned"
            pairs.append((key, op, value))
        rules.append(pairs)
    return rules


def test_udev_rules_cover_both_usb_ids_and_the_apex_device() -> None:
    rules = parse_udev_rules(RULES.read_text())
    usb = {(dict((k, v) for k, _, v in r)["ATTR{idVendor}"], dict((k, v) for k, _, v in r)["ATTR{idProduct}"]): r
           for r in rules if ("SUBSYSTEM", "==", "usb") in r}  # fmt: skip
    assert set(usb) == {("1a6e", "089a"), ("18d1", "9302")}
    for rule in usb.values():
        assert ("ENV{DEVTYPE}", "==", "usb_device") in rule  # the device node, not its interfaces
        assert ("GROUP", "=", "plugdev") in rule and ("MODE", "=", "0660") in rule
    [apex] = [r for r in rules if ("SUBSYSTEM", "==", "apex") in r]
    assert ("GROUP", "=", "apex") in apex and ("MODE", "=", "0660") in apex


def test_udev_rule_parser_rejects_what_udev_rejects() -> None:
    with pytest.raises(AssertionError):
        parse_udev_rules('SUBSYSTEM="usb", GROUP="plugdev"\n')  # assignment to a match-only key
    with pytest.raises(AssertionError):
        parse_udev_rules("SUBSYSTEM==usb\n")  # unquoted value


# --- install-service ------------------------------------------------------------------------------
def run_install(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "segd", "install-service", *args],
                          capture_output=True, text=True, timeout=60, check=False, env=env)  # fmt: skip


def test_install_service_writes_unit_env_and_rules_under_root_and_runs_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    proc = run_install("--root", str(root), "--exec", f"{sys.prefix}/bin/segd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unit = root / "etc/systemd/system/segd.service"
    env = root / "etc/segd/segd.env"
    rules = root / "etc/udev/rules.d/99-coral-edgetpu.rules"
    assert env.read_text() == ENV_FILE.read_text() and env.stat().st_mode & 0o777 == 0o600
    assert rules.read_text() == RULES.read_text() and rules.stat().st_mode & 0o777 == 0o644
    assert f"ExecStart={sys.prefix}/bin/segd serve" in unit.read_text()
    assert "skip systemctl daemon-reload — not run: installing under" in proc.stdout
    assert "\nrun " not in proc.stdout

    # Again, after the admin edited the settings: the settings are kept, the unit is unchanged.
    env.write_text("SEGD_HOST=0.0.0.0\n")
    again = run_install("--root", str(root), "--exec", f"{sys.prefix}/bin/segd")
    assert again.returncode == 0
    assert env.read_text() == "SEGD_HOST=0.0.0.0\n"
    assert (
        f"keep {env} — already there" in again.stdout and f"keep {unit} — unchanged" in again.stdout
    )


def test_install_service_edgetpu_pair_installs_the_tables_pinned_pair_and_sets_its_python(tmp_path: Path) -> None:
    from segd.runtime import pairing

    root = tmp_path / "root"
    proc = run_install("--root", str(root), "--exec", f"{sys.prefix}/bin/segd", "--edgetpu-pair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = pairing.Table.load().recommended
    for step in pairing.install_steps(rec):  # the pinned .deb and wheel of this machine's arch
        assert f"skip {shlex.join(step)} — not run: installing under {root}" in proc.stdout
    assert f"{rec.package}_{rec.package_version}.bookworm_" in proc.stdout and f"tflite_runtime-{rec.runtime_version}-" in proc.stdout
    env = (root / "etc/segd/segd.env").read_text()
    assert "\nSEGD_EDGETPU_PYTHON=/opt/segd-tpu/bin/python\n" in env
    assert load_settings(env=env_lines(env)[0]).edgetpu_python == "/opt/segd-tpu/bin/python"
    user = run_install("--root", str(root), "--user", "--edgetpu-pair")
    assert user.returncode == 2 and "without --user" in user.stderr


def test_install_service_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = run_install("--root", str(root), "--dry-run")
    assert proc.returncode == 0
    assert f"would write {root}/etc/systemd/system/segd.service" in proc.stdout
    assert not root.exists()


def test_install_service_refuses_an_executable_the_sandbox_cannot_see(tmp_path: Path) -> None:
    from segd.install import InstallError, check_exec

    with pytest.raises(InstallError, match="ProtectHome=yes"):
        check_exec("/home/pi/venv/bin/segd")
    with pytest.raises(InstallError, match="not an executable file"):
        check_exec(str(tmp_path / "nope"))
    if not sys.prefix.startswith(("/home/", "/root/")):
        check_exec(f"{sys.prefix}/bin/segd")  # this run's own segd is acceptable


def test_install_service_user_mode_writes_into_home(tmp_path: Path) -> None:
    root, home = tmp_path / "root", Path("/home/someone")
    proc = run_install("--root", str(root), "--user", "--exec", f"{sys.prefix}/bin/segd", home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unit = root / "home/someone/.config/systemd/user/segd.service"
    assert "EnvironmentFile=-%h/.config/segd/segd.env" in unit.read_text()
    assert (root / "home/someone/.config/segd/segd.env").is_file()
    assert not (root / "etc").exists()
    assert "systemctl --user enable --now segd" in proc.stdout


def test_install_service_in_a_container_or_chroot_skips_udev_and_systemd_and_says_so() -> None:
    from segd.install import plan

    exec_path = f"{sys.prefix}/bin/segd"
    if sys.prefix.startswith(("/home/", "/root/")):
        pytest.skip("this run's segd is under a directory the service cannot see")
    steps = plan(Path("/"), exec_path, systemd_live=False, udev_live=False)
    commands = {s.target: s for s in steps if s.action in ("run", "skip")}
    assert commands["systemctl daemon-reload"].action == "skip"
    assert "systemd is not running here" in commands["systemctl daemon-reload"].describe(False)
    udev = [s for s in steps if s.target.startswith("udevadm")]
    assert len(udev) == 2 and all(s.action == "skip" and "udev is not running" in s.note for s in udev)
    assert any(s.action == "write" and s.target.endswith("segd.service") for s in steps) or any(
        s.action == "keep" and s.target.endswith("segd.service") for s in steps
    )
    # On a booted machine the same commands run.
    live = plan(Path("/"), exec_path, systemd_live=True, udev_live=True)
    assert {s.target for s in live if s.action == "run"} >= {"systemctl daemon-reload", *(s.target for s in udev)}
