"""WorkerRunner against real child processes running the Edge TPU runtime on the fake libedgetpu
(tests/edgetpu_double): the double's abort() and hang modes are what a USB transfer error and a
wedged device do to the real one."""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from segd.errors import ModelError, RequestTimeout, RuntimeUnavailable, WorkerCrashed
from segd.runtime.cpu import open_cpu
from segd.runtime.worker import (
    SHM_PREFIX,
    EdgeTpuFactory,
    WorkerRunner,
    backoff_delay,
    describe_exit,
    edgetpu_worker_factory,
)

CPU_MODEL = "deeplabv3_mnv2_dm05_pascal_quant.tflite"
FAST = {"backoff_base": 0.2, "backoff_max": 2.0, "start_timeout": 60.0}


@pytest.fixture(scope="module")
def model(test_data: Path) -> bytes:
    return (test_data / CPU_MODEL).read_bytes()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (513, 513, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def expected(model: bytes, images: list[np.ndarray]) -> list[np.ndarray]:
    """In-process CPU outputs: what the worker must reproduce exactly."""
    runner = open_cpu(model)
    try:
        return [runner.run(x) for x in images]
    finally:
        runner.close()


def own_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"{SHM_PREFIX}{os.getpid()}_")}


@pytest.fixture
def worker_env(fake_edgetpu: Path) -> Iterator[Path]:
    """The double on one USB device; after the test, no worker child or segment may remain."""
    yield fake_edgetpu
    assert multiprocessing.active_children() == []
    assert own_segments() == set()


def wait_ready(worker: WorkerRunner, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.describe()["state"] != "ready":
        assert time.monotonic() < deadline, worker.describe()
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- pure helpers -------------------------------------------------------------------------
def test_backoff_doubles_from_the_base_up_to_the_maximum() -> None:
    assert [backoff_delay(n, 0.5, 5.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff_delay(0, 0.5, 5.0) == 0.0
    assert backoff_delay(10_000, 0.5, 5.0) == 5.0


def test_exit_codes_read_as_signals_or_codes() -> None:
    assert describe_exit(-signal.SIGABRT) == "killed by SIGABRT"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


def test_edgetpu_factory_is_picklable_for_spawn(model: bytes) -> None:
    factory = EdgeTpuFactory(model, device="usb:0", library="/x/libedgetpu.so.1")
    assert pickle.loads(pickle.dumps(factory)) == factory


# --- normal operation ---------------------------------------------------------------------
def test_worker_output_equals_in_process_output(
    worker_env: Path, model: bytes, images: list[np.ndarray], expected: list[np.ndarray]
) -> None:
    with WorkerRunner(EdgeTpuFactory(model, device="usb"), **FAST) as worker:
        info = worker.describe()
        assert info["backend"] == "edgetpu" and info["isolation"] == "process"
        assert info["state"] == "ready" and info["restarts"] == 0 and info["last_crash"] is None
        assert info["device"] == "/sys/bus/usb/devices/2-1"
        assert worker.input.shape == (1, 513, 513, 3) and worker.output.dtype == np.int64
        assert worker.pid is not None and worker.pid != os.getpid()
        for x, want in zip(images, expected, strict=True):
            np.testing.assert_array_equal(worker.run(x), want)
        # with the batch dimension too, as the in-process runner accepts
        np.testing.assert_array_equal(worker.run(images[0][None]), expected[0])


def test_engine_style_factory_opens_a_worker(
    worker_env: Path, model: bytes, images: list[np.ndarray], expected: list[np.ndarray],
    double_pairings: Path,
) -> None:
    make = edgetpu_worker_factory(pairings=double_pairings, **FAST)
    worker = make(model, "usb:0")
    try:
        assert isinstance(worker, WorkerRunner)
        np.testing.assert_array_equal(worker.run(images[1]), expected[1])
    finally:
        worker.close()


def test_runs_from_a_thread_pool_are_serialised_and_correct(
    worker_env: Path, model: bytes, images: list[np.ndarray], expected: list[np.ndarray]
) -> None:
    with WorkerRunner(EdgeTpuFactory(model), **FAST) as worker, ThreadPoolExecutor(4) as pool:
        jobs = [i % len(images) for i in range(12)]
        outs = list(pool.map(lambda i: worker.run(images[i]), jobs))
    for i, out in zip(jobs, outs, strict=True):
        np.testing.assert_array_equal(out, expected[i])


def test_bad_input_raises_without_hurting_the_worker(
    worker_env: Path, model: bytes, images: list[np.ndarray], expected: list[np.ndarray]
) -> None:
    with WorkerRunner(EdgeTpuFactory(model), **FAST) as worker:
        with pytest.raises(ValueError, match="dtype"):
            worker.run(images[0].astype(np.float32))
        with pytest.raises(ValueError):  # raised by the interpreter in the child, same type here
            worker.run(images[0][:300])
        np.testing.assert_array_equal(worker.run(images[0]), expected[0])
        assert worker.describe()["crashes"] == 0


# --- start-up -----------------------------------------------------------------------------
def test_start_up_failure_in_the_child_is_raised_typed(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch, model: bytes
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "fail")
    monkeypatch.setenv("FAKE_EDGETPU_ERROR", "Edge TPU firmware upload failed")
    with pytest.raises(RuntimeUnavailable) as info:
        WorkerRunner(EdgeTpuFactory(model), **FAST)
    assert info.value.detail == (
        "Edge TPU delegate creation failed on device (any): Edge TPU firmware upload failed"
    )


def test_start_up_model_error_keeps_its_type(worker_env: Path) -> None:
    with pytest.raises(ModelError, match="runtime refused the model"):
        WorkerRunner(functools.partial(open_cpu, b"not a tflite file"), **FAST)


def test_child_aborting_at_start_up_is_a_worker_crash(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch, model: bytes
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "crash_on_create")
    with pytest.raises(WorkerCrashed, match=r"died during start-up \(killed by SIGABRT\)"):
        WorkerRunner(EdgeTpuFactory(model), **FAST)


# --- crashes and restarts -----------------------------------------------------------------
def test_abort_mid_request_then_backoff_then_served_again(
    worker_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: bytes,
    images: list[np.ndarray],
    expected: list[np.ndarray],
) -> None:
    # the double runs the claimed node for 2 invocations, then abort()s (USB transfer error)
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "crash_on_invoke")
    monkeypatch.setenv("FAKE_EDGETPU_CRASH_AFTER", "2")
    with WorkerRunner(EdgeTpuFactory(model), backoff_base=1.0, backoff_max=4.0) as worker:
        first_pid = worker.pid
        assert first_pid is not None
        np.testing.assert_array_equal(worker.run(images[0]), expected[0])
        np.testing.assert_array_equal(worker.run(images[1]), expected[1])
        with pytest.raises(
            WorkerCrashed, match=r"killed by SIGABRT during the request; restarting in 1\.0 s"
        ):
            worker.run(images[2])
        assert not pid_alive(first_pid)  # reaped, not a zombie
        # while it backs off, calls fail at once instead of blocking
        started = time.monotonic()
        with pytest.raises(WorkerCrashed, match=r"retry in 1 s"):
            worker.run(images[2])
        assert time.monotonic() - started < 0.5
        info = worker.describe()
        assert info["state"] in ("restarting", "starting") and info["crashes"] == 1
        assert "SIGABRT" in info["last_crash"]

        wait_ready(worker)
        assert worker.pid not in (None, first_pid)
        np.testing.assert_array_equal(worker.run(images[2]), expected[2])
        info = worker.describe()
        assert info["restarts"] == 1 and info["crashes"] == 1 and info["state"] == "ready"


def test_repeated_crashes_back_off_exponentially(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch, model: bytes, images: list[np.ndarray]
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "crash_on_invoke")  # every request aborts
    with WorkerRunner(EdgeTpuFactory(model), backoff_base=0.2, backoff_max=0.5) as worker:
        delays = []
        for _ in range(3):
            with pytest.raises(WorkerCrashed) as info:
                worker.run(images[0])
            delays.append(info.value.detail.rpartition("restarting in ")[2])
            wait_ready(worker)
        assert delays == ["0.2 s", "0.4 s", "0.5 s"]
        assert worker.describe()["restarts"] == 3


def test_sigkill_of_the_child_mid_request(
    worker_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: bytes,
    images: list[np.ndarray],
    expected: list[np.ndarray],
) -> None:
    # one good invocation, then the device "hangs" so the request is surely in flight
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "hang_on_invoke")
    monkeypatch.setenv("FAKE_EDGETPU_CRASH_AFTER", "1")
    with WorkerRunner(EdgeTpuFactory(model), call_timeout=60.0, **FAST) as worker:
        np.testing.assert_array_equal(worker.run(images[0]), expected[0])
        victim = worker.pid
        assert victim is not None
        outcome: list[BaseException] = []

        def request() -> None:
            try:
                worker.run(images[1])
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=request)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # in flight, blocked in the child's invoke
        os.kill(victim, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], WorkerCrashed)
        assert "killed by SIGKILL during the request" in str(outcome[0])

        wait_ready(worker)  # the new child gets one good invocation again
        np.testing.assert_array_equal(worker.run(images[1]), expected[1])
        assert worker.describe()["restarts"] == 1


def test_hung_invoke_times_out_and_the_worker_is_replaced(
    worker_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: bytes,
    images: list[np.ndarray],
    expected: list[np.ndarray],
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "hang_on_invoke")
    monkeypatch.setenv("FAKE_EDGETPU_CRASH_AFTER", "1")
    with WorkerRunner(EdgeTpuFactory(model), call_timeout=1.0, **FAST) as worker:
        np.testing.assert_array_equal(worker.run(images[0]), expected[0])
        hung = worker.pid
        assert hung is not None
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"did not answer within 1 s; worker killed"):
            worker.run(images[1])
        assert 1.0 <= time.monotonic() - started < 10.0
        assert not pid_alive(hung)
        assert "no answer within 1 s" in worker.describe()["last_crash"]
        wait_ready(worker)
        np.testing.assert_array_equal(worker.run(images[1]), expected[1])


# --- shutdown -----------------------------------------------------------------------------
def test_close_leaves_no_child_and_no_shared_memory(
    worker_env: Path, model: bytes, images: list[np.ndarray]
) -> None:
    worker = WorkerRunner(EdgeTpuFactory(model), **FAST)
    pid = worker.pid
    assert pid is not None and pid_alive(pid)
    assert len(own_segments()) == 2  # input and output
    worker.run(images[0])
    worker.close()
    assert not pid_alive(pid)
    assert own_segments() == set()
    assert multiprocessing.active_children() == []
    assert worker.describe()["state"] == "closed"
    with pytest.raises(WorkerCrashed, match="closed"):
        worker.run(images[0])
    worker.close()  # idempotent


def test_close_during_backoff_cancels_the_restart(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch, model: bytes, images: list[np.ndarray]
) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", "crash_on_invoke")
    worker = WorkerRunner(EdgeTpuFactory(model), backoff_base=30.0, backoff_max=30.0)
    with pytest.raises(WorkerCrashed):
        worker.run(images[0])
    started = time.monotonic()
    worker.close()
    assert time.monotonic() - started < 5.0
    assert worker.describe()["restarts"] == 0
