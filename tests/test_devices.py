"""Several Edge TPUs in one daemon: the latency-simulating double (tests/edgetpu_double,
FAKE_EDGETPU_MODE=latency) lists N devices through libedgetpu's C API; segd opens one supervised
worker per device and dispatches to the least loaded. A worker that crashes or a device that is
unplugged takes only itself down. Real uvicorn, real models, real worker processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import pairings_for
from daemon import Daemon, start_daemon

from segd.app.settings import load_settings
from segd.errors import RuntimeUnavailable
from segd.runtime.edgetpu import EdgeTpuDevice
from segd.runtime.pool import resolve_devices
from segd.synthetic import synthetic_jpeg

DM05 = "deeplabv3_mnv2_dm05_pascal"
PATHS = [f"/sys/bus/usb/devices/2-{i}" for i in (1, 2, 3)]


def test_devices_setting_resolves_names_and_all_to_device_paths() -> None:
    listed = [EdgeTpuDevice("usb", PATHS[0]), EdgeTpuDevice("pci", "/dev/apex_0"), EdgeTpuDevice("usb", PATHS[1])]
    assert resolve_devices(["all"], listed) == [PATHS[0], "/dev/apex_0", PATHS[1]]
    assert resolve_devices(["usb:1", "pci:0", "usb"], listed) == [PATHS[1], "/dev/apex_0", PATHS[0]]
    assert resolve_devices([":1", "/dev/apex_0"], listed) == ["/dev/apex_0"]
    with pytest.raises(RuntimeUnavailable, match="usb:2"):
        resolve_devices(["usb:2"], listed)
    with pytest.raises(RuntimeUnavailable, match="no Edge TPU"):
        resolve_devices(["all"], [])


def test_devices_setting_reads_lists_and_refuses_mixing_with_device() -> None:
    assert load_settings(env={"SEGD_DEVICES": "usb:0, pci:0"}).devices == ["usb:0", "pci:0"]
    assert load_settings(env={"SEGD_DEVICES": "all"}).devices == ["all"]
    with pytest.raises(ValueError, match="not both"):
        load_settings(env={"SEGD_DEVICES": "all", "SEGD_DEVICE": "usb:0"})
    with pytest.raises(ValueError, match="'all'"):
        load_settings(env={"SEGD_DEVICES": "all,usb:0"})
    assert load_settings(env={}).tpu_pipeline == 2
    with pytest.raises(ValueError, match="tpu_pipeline"):
        load_settings(env={"SEGD_TPU_PIPELINE": "0"})


@pytest.fixture(scope="module")
def fleet_of_tpus(edgetpu_double: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    tmp = tmp_path_factory.mktemp("devices")
    plugged = tmp / "devices"
    plugged.write_text(",".join(f"usb:{p}" for p in PATHS))
    env = {
        "SEGD_EDGETPU_LIBRARY": str(edgetpu_double),
        "SEGD_EDGETPU_PAIRINGS": str(pairings_for(edgetpu_double, tmp / "pairings.toml")),
        "FAKE_EDGETPU_MODE": "latency",
        "FAKE_EDGETPU_INVOKE_MS": "20",
        "FAKE_EDGETPU_DEVICES_FILE": str(plugged),
        "SEGD_DEVICES": "all",
        "SEGD_RELAX_SIMULATED_TPU_SELFTEST": "1",
        "SEGD_TPU_FALLBACK": "cpu",
        "SEGD_DEVICE_CHECK_INTERVAL": "0.2",
        "SEGD_WORKER_RESTART_BASE": "0.2",
        "SEGD_QUEUE_SIZE": "64",
    }
    daemon = start_daemon(tmp, models_dir, "--model", DM05, "--threads", "1", env=env)
    yield daemon, plugged
    daemon.stop()


def devices_of(daemon: Daemon) -> dict[str, dict[str, Any]]:
    with daemon.client() as c:
        (model,) = c.get("/models").json()["models"]
    assert model["backend"] == "edgetpu", model
    return {d["device"]: d for d in model["worker"]["devices"]}


class Load:
    """4 clients posting 513x513 JPEGs until stopped; every answer is recorded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.image = synthetic_jpeg((513, 513))
        self.answers: list[tuple[int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client) for _ in range(4)]

    def client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/segment", params={"format": "json"}, content=self.image,
                               headers={"Content-Type": "image/jpeg"})  # fmt: skip
                    self.answers.append((r.status_code, r.headers.get("x-segd-backend", "")))
                except httpx.HTTPError as exc:
                    self.answers.append((0, type(exc).__name__))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def failed(self) -> list[tuple[int, str]]:
        return [a for a in self.answers if a[0] != 200]


def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_requests_are_dispatched_across_every_device(fleet_of_tpus: tuple[Daemon, Path]) -> None:
    daemon, _ = fleet_of_tpus
    before = {p: d["requests"] for p, d in devices_of(daemon).items()}
    assert set(before) == set(PATHS)
    with Load(daemon.url) as load:
        wait_until(lambda: len(load.answers) >= 30)
    assert load.failed() == []
    assert {backend for _, backend in load.answers} == {"edgetpu"}
    after = devices_of(daemon)
    served = {p: after[p]["requests"] - before[p] for p in PATHS}
    assert all(n > 0 for n in served.values()), served
    # least-loaded: no device took more than twice its fair share
    assert max(served.values()) <= 2 * sum(served.values()) / len(PATHS) + 2, served

    with daemon.client() as c:
        metrics = c.get("/metrics").text
        ready = c.get("/readyz").json()["models"][DM05]
    for path in PATHS:
        assert f'segd_tpu_device_requests_total{{device="{path}",model="{DM05}"}}' in metrics
        assert f'segd_tpu_device_up{{device="{path}",model="{DM05}"}} 1.0' in metrics
    assert ready["devices"] == dict.fromkeys(PATHS, "ready")


def test_a_crashed_device_worker_takes_only_itself_down(fleet_of_tpus: tuple[Daemon, Path]) -> None:
    daemon, _ = fleet_of_tpus
    victim = PATHS[1]
    before = devices_of(daemon)
    with Load(daemon.url) as load:
        wait_until(lambda: len(load.answers) >= 10)
        os.kill(before[victim]["pid"], signal.SIGKILL)  # what libedgetpu's abort() does to it
        wait_until(lambda: devices_of(daemon)[victim]["restarts"] > before[victim]["restarts"]
                   and devices_of(daemon)[victim]["state"] == "ready")  # fmt: skip
        served_after = len(load.answers)
        wait_until(lambda: len(load.answers) >= served_after + 10)
    assert load.failed() == [], load.failed()
    after = devices_of(daemon)
    assert after[victim]["pid"] != before[victim]["pid"]
    for other in (PATHS[0], PATHS[2]):  # the other devices never stopped
        assert after[other]["restarts"] == before[other]["restarts"]
        assert after[other]["pid"] == before[other]["pid"]
        assert after[other]["requests"] > before[other]["requests"]
    with daemon.client() as c:
        metrics = c.get("/metrics").text
    assert f'segd_tpu_device_worker_restarts_total{{device="{victim}",model="{DM05}"}} {after[victim]["restarts"]:.1f}' in metrics


def test_an_unplugged_device_is_skipped_and_used_again_when_plugged_back(
    fleet_of_tpus: tuple[Daemon, Path],
) -> None:
    daemon, plugged = fleet_of_tpus
    gone = PATHS[2]
    with Load(daemon.url) as load:
        wait_until(lambda: len(load.answers) >= 10)
        plugged.write_text(",".join(f"usb:{p}" for p in PATHS if p != gone))
        wait_until(lambda: devices_of(daemon)[gone]["state"] == "absent")
        with daemon.client() as c:
            r = c.get("/readyz")
        assert r.status_code == 200, r.text  # the other devices keep the model ready
        assert r.json()["models"][DM05]["devices"][gone] == "absent"
        while_gone = devices_of(daemon)[gone]["requests"]
        mark = len(load.answers)
        wait_until(lambda: len(load.answers) >= mark + 15)
        assert devices_of(daemon)[gone]["requests"] == while_gone  # nothing sent to it
        plugged.write_text(",".join(f"usb:{p}" for p in PATHS))
        wait_until(lambda: devices_of(daemon)[gone]["state"] == "ready")
        wait_until(lambda: devices_of(daemon)[gone]["requests"] > while_gone)
    assert load.failed() == [], load.failed()
    with daemon.client() as c:
        assert f'segd_tpu_device_up{{device="{gone}",model="{DM05}"}} 1.0' in c.get("/metrics").text


def test_a_device_plugged_in_after_start_up_joins_with_devices_all(fleet_of_tpus: tuple[Daemon, Path]) -> None:
    daemon, plugged = fleet_of_tpus
    new = "/sys/bus/usb/devices/4-1"
    with Load(daemon.url) as load:
        plugged.write_text(",".join(f"usb:{p}" for p in [*PATHS, new]))
        wait_until(lambda: new in devices_of(daemon) and devices_of(daemon)[new]["state"] == "ready")
        wait_until(lambda: devices_of(daemon)[new]["requests"] > 0)
    assert load.failed() == [], load.failed()
    assert set(devices_of(daemon)) == {*PATHS, new}
