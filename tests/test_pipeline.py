"""The pipelined Edge TPU worker: two requests in the child at once, each in its own slot of the
shared memory, answers routed back to the right caller; a crash with both in flight fails both
and the worker restarts. The TPU is the latency-simulating double (FAKE_EDGETPU_MODE=latency):
its output is a deterministic function of the input, so a mixed-up slot shows."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from segd.engine import model_bytes
from segd.errors import WorkerCrashed
from segd.runtime.worker import EdgeTpuFactory, WorkerRunner
from segd.variants import Manifest

DM05 = "deeplabv3_mnv2_dm05_pascal"


@pytest.fixture
def simulated_worker(fake_edgetpu: Path, manifest: Manifest, models_dir: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "latency")
    monkeypatch.setenv("FAKE_EDGETPU_INVOKE_MS", "40")
    variant = manifest.get(DM05)
    assert variant.edgetpu is not None
    data = model_bytes(variant, variant.edgetpu, models_dir / variant.edgetpu.name)
    runner = WorkerRunner(EdgeTpuFactory(data, "usb:0", str(fake_edgetpu)), backoff_base=0.1, call_timeout=10)
    yield runner
    runner.close()


def inputs(runner: WorkerRunner, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    shape = runner.input.shape[1:]
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def test_two_requests_in_flight_each_get_their_own_answer(simulated_worker: WorkerRunner) -> None:
    runner = simulated_worker
    assert runner.parallelism == 2
    batch = inputs(runner, 12)
    serial = [runner.run(x) for x in batch]
    assert all(not np.array_equal(serial[0], s) for s in serial[1:])  # distinct answers

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(runner.run, batch))
    wall = time.perf_counter() - t0
    for want, got in zip(serial, together, strict=True):
        np.testing.assert_array_equal(got, want)
    # the device is the bottleneck: 12 invokes of 40 ms cannot finish in less than 0.48 s
    assert wall >= 12 * 0.040 * 0.95


def test_a_crash_with_two_requests_in_flight_fails_both_and_the_worker_restarts(
    simulated_worker: WorkerRunner,
) -> None:
    runner = simulated_worker
    batch = inputs(runner, 2)
    runner.run(batch[0])
    pid = runner.pid
    assert pid is not None
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(runner.run, x) for x in batch]
        time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        outcomes = [f.exception(timeout=30) for f in futures]
    assert sum(isinstance(e, WorkerCrashed) for e in outcomes) >= 1, outcomes
    assert all(e is None or isinstance(e, WorkerCrashed) for e in outcomes), outcomes
    deadline = time.monotonic() + 30
    while runner.state != "ready":
        assert time.monotonic() < deadline, runner.describe()
        time.sleep(0.05)
    assert runner.pid != pid and runner.restarts == 1
    assert runner.run(batch[1]).shape == runner.output.shape[1:]


def test_in_process_device_pool_serialises_each_interpreter_and_spreads_the_load(
    fake_edgetpu: Path, manifest: Manifest, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tpu_isolation off: one in-process interpreter per device, never two callers at once on
    one (the double's answers would be garbled), every device used."""
    from segd.runtime.edgetpu import open_edgetpu
    from segd.runtime.pool import DevicePool

    monkeypatch.setenv("FAKE_EDGETPU_MODE", "latency")
    monkeypatch.setenv("FAKE_EDGETPU_INVOKE_MS", "10")
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "usb:/sys/bus/usb/devices/2-1,pci:/dev/apex_0")
    variant = manifest.get(DM05)
    assert variant.edgetpu is not None
    data = model_bytes(variant, variant.edgetpu, models_dir / variant.edgetpu.name)
    pool = DevicePool.open(["/sys/bus/usb/devices/2-1", "/dev/apex_0"],
                           lambda path: open_edgetpu(data, device=path, library=str(fake_edgetpu)))  # fmt: skip
    try:
        rng = np.random.default_rng(3)
        batch = [rng.integers(0, 256, pool.input.shape[1:], dtype=np.uint8) for _ in range(16)]
        serial = [pool.run(x) for x in batch]
        with ThreadPoolExecutor(6) as threads:
            together = list(threads.map(pool.run, batch))
        for want, got in zip(serial, together, strict=True):
            np.testing.assert_array_equal(got, want)
        served = {d["device"]: d["requests"] for d in pool.devices()}
        assert all(n > 0 for n in served.values()), served
    finally:
        pool.close()


def test_a_device_that_fails_to_open_leaves_the_others_serving(
    fake_edgetpu: Path, manifest: Manifest, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segd.errors import RuntimeUnavailable
    from segd.runtime.edgetpu import open_edgetpu
    from segd.runtime.pool import DevicePool

    monkeypatch.setenv("FAKE_EDGETPU_MODE", "latency")
    monkeypatch.setenv("FAKE_EDGETPU_INVOKE_MS", "1")
    monkeypatch.setenv("FAKE_EDGETPU_DEVICES", "usb:/sys/bus/usb/devices/2-1")
    variant = manifest.get(DM05)
    assert variant.edgetpu is not None
    data = model_bytes(variant, variant.edgetpu, models_dir / variant.edgetpu.name)

    def open_one(path: str):  # type: ignore[no-untyped-def]
        return open_edgetpu(data, device=path, library=str(fake_edgetpu))

    pool = DevicePool.open(["/sys/bus/usb/devices/9-9", "/sys/bus/usb/devices/2-1"], open_one)
    try:
        assert [d["device"] for d in pool.devices()] == ["/sys/bus/usb/devices/2-1"]
        assert pool.run(np.zeros(pool.input.shape[1:], np.uint8)).shape == pool.output.shape[1:]
    finally:
        pool.close()
    with pytest.raises(RuntimeUnavailable, match="9-9"):
        DevicePool.open(["/sys/bus/usb/devices/9-9"], open_one)
