"""The ``segd`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import read_mask_png


def segd(*args: str, models_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGD_")}
    env["SEGD_MODELS_DIR"] = str(models_dir)
    env["SEGD_EDGETPU_LIBRARY"] = "/nonexistent/libedgetpu.so.1"
    return subprocess.run([sys.executable, "-m", "segd", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_segment_prints_a_json_summary_and_says_which_backend_and_why(models_dir: Path, test_data: Path) -> None:
    r = segd("segment", str(test_data / "bird.bmp"), models_dir=models_dir)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["width"], doc["height"], doc["backend"]) == (512, 343, "cpu")
    assert "bird" in [c["label"] for c in doc["classes"]]


def test_segment_writes_png_mask_and_overlay(models_dir: Path, test_data: Path, tmp_path: Path) -> None:
    r = segd("segment", str(test_data / "cat.bmp"), "--format", "png", "-o", str(tmp_path / "m.png"),
             "--model", "deeplabv3_mnv2_dm05_pascal", models_dir=models_dir)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "on cpu (libedgetpu not installed" in r.stderr
    mask = read_mask_png((tmp_path / "m.png").read_bytes())
    assert mask.shape == (341, 512) and 8 in np.unique(mask)  # cat
    r = segd("segment", str(test_data / "cat.bmp"), "--format", "overlay", "-o", str(tmp_path / "o.jpg"), models_dir=models_dir)
    assert r.returncode == 0, r.stderr
    assert cv2.imread(str(tmp_path / "o.jpg")).shape == (341, 512, 3)


def test_segment_reports_bad_input_and_unknown_models_without_a_traceback(models_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\nnonsense")
    r = segd("segment", str(junk), models_dir=models_dir)
    assert r.returncode == 2 and "segd: bad_image:" in r.stderr and "Traceback" not in r.stderr
    r = segd("segment", str(junk), "--model", "nope", models_dir=models_dir)
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr
    r = segd("segment", str(tmp_path / "missing.jpg"), models_dir=models_dir)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_models_list_shows_variants_and_which_files_are_present(models_dir: Path, tmp_path: Path) -> None:
    r = segd("models", "list", "--json", models_dir=models_dir)
    doc = json.loads(r.stdout)
    pascal = next(v for v in doc["variants"] if v["name"] == "deeplabv3_mnv2_pascal")
    assert pascal["default"] and all(pascal["files"].values())
    r = segd("models", "list", models_dir=tmp_path)
    assert "[missing]" in r.stdout and "* deeplabv3_mnv2_pascal" in r.stdout


def test_bench_prints_the_latency_table(models_dir: Path) -> None:
    r = segd("bench", "--model", "deeplabv3_mnv2_dm05_pascal", "--iterations", "3", "--warmup", "1", models_dir=models_dir)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| deeplabv3_mnv2_dm05_pascal"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "cpu" and float(cells[3]) > 0 and float(cells[5]) > 0
    assert "libedgetpu not installed" in r.stdout


def test_models_check_reports_the_edgetpu_cut_and_exits_nonzero_when_not_fully_mapped(test_data: Path, tmp_path: Path) -> None:
    r = segd("models", "check", str(test_data / "deeplabv3_mnv2_pascal_quant.tflite"), models_dir=tmp_path)
    assert r.returncode == 1
    assert "64/72 ops mapped" in r.stdout and "Edge TPU segment: ops 0..63" in r.stdout


def test_a_native_crash_in_a_worker_thread_names_the_thread_and_ends_the_process() -> None:
    # What a TFLite kernel crashing in the inference thread looks like: a segfault off the main
    # thread. segd's CLI turns that into a report on stderr and a process that exits by the signal.
    code = (
        "import ctypes, threading, sys; from segd.cli import enable_crash_reports; enable_crash_reports()\n"
        "def invoke(): ctypes.string_at(0)\n"
        "t = threading.Thread(target=invoke, name='invoke_0'); t.start(); t.join(); sys.exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -11, (proc.returncode, proc.stderr)
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "in invoke" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (a PID namespace)")
def test_as_pid1_a_crash_the_kernel_would_drop_still_ends_segd_with_the_signal_status() -> None:
    # A container's PID 1 ignores self-sent fatal signals (what a crash under qemu-user is), so
    # segd as PID 1 serves from a child and returns its status: 128 + 11 for SIGSEGV.
    code = (
        "import os, signal, sys\n"
        "from segd.cli import supervise_if_pid1\n"
        "assert os.getpid() == 1\n"
        "status = supervise_if_pid1()\n"
        "if status is None:\n"
        "    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    sys.exit(0)  # not reached in the child\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 139, (proc.returncode, proc.stderr)
    # SIGTERM to PID 1 reaches the server process, which exits 0 as after a drained shutdown.
    code_term = (
        "import os, signal, sys, time\n"
        "from segd.cli import supervise_if_pid1\n"
        "status = supervise_if_pid1()\n"
        "if status is None:\n"
        "    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "    os.kill(1, signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "    sys.exit(3)\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", sys.executable, "-c", code_term],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
