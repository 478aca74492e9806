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
    assert r.returncode == 2 and "junk.png: bad_image:" in r.stderr and "Traceback" not in r.stderr
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


def test_version_prints_the_package_version() -> None:
    from segd import __version__

    r = subprocess.run([sys.executable, "-m", "segd", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"segd {__version__}"


def test_segment_several_files_and_a_directory(models_dir: Path, test_data: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("bird.bmp", "cat.bmp"):
        (photos / name).write_bytes((test_data / name).read_bytes())
    (photos / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    dm05 = ("--model", "deeplabv3_mnv2_dm05_pascal")
    r = segd("segment", str(photos), str(test_data / "bird.bmp"), *dm05, models_dir=models_dir)
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(d["file"]).name for d in docs] == ["bird.bmp", "cat.bmp", "bird.bmp"]
    assert "3/3 images" in r.stderr
    out = tmp_path / "masks"
    r = segd("segment", str(photos), "--format", "png", "-o", str(out), *dm05, models_dir=models_dir)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bird.png", "cat.png"]
    assert read_mask_png((out / "cat.png").read_bytes()).shape == (341, 512)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff junk")
    r = segd("segment", str(photos), *dm05, models_dir=models_dir)
    assert r.returncode == 2 and "broken.jpg: bad_image" in r.stderr and len(r.stdout.splitlines()) == 2


def test_segment_reads_stdin_and_writes_stdout(models_dir: Path, test_data: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGD_")}
    env.update(SEGD_MODELS_DIR=str(models_dir), SEGD_EDGETPU_LIBRARY="/nonexistent/libedgetpu.so.1")
    r = subprocess.run([sys.executable, "-m", "segd", "segment", "-", "--format", "png", "-o", "-",
                        "--model", "deeplabv3_mnv2_dm05_pascal"],
                       input=(test_data / "cat.bmp").read_bytes(), capture_output=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    mask = read_mask_png(r.stdout)
    assert mask.shape == (341, 512) and 8 in np.unique(mask)


def test_output_piped_into_head_ends_quietly(models_dir: Path, test_data: Path) -> None:
    """`segd segment DIR | head -1`: the reader goes away; no BrokenPipeError traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGD_")}
    env.update(SEGD_MODELS_DIR=str(models_dir), SEGD_EDGETPU_LIBRARY="/nonexistent/libedgetpu.so.1")
    images = [str(test_data / "bird.bmp")] * 4
    cmd = f"{sys.executable} -m segd segment {' '.join(images)} --model deeplabv3_mnv2_dm05_pascal | head -1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(r.stdout)["file"].endswith("bird.bmp")
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.returncode == 141


def test_models_check_refuses_a_non_model_and_recognises_a_compiled_one(test_data: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    r = segd("models", "check", str(text), models_dir=tmp_path)
    assert r.returncode == 2 and "is not a .tflite model" in r.stderr and "Traceback" not in r.stderr
    r = segd("models", "check", str(test_data / "deeplabv3_mnv2_pascal_quant_edgetpu.tflite"), models_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "already compiled for the Edge TPU" in r.stdout and "0/9 ops mapped" not in r.stdout


def test_bench_draws_progress_on_a_terminal(models_dir: Path) -> None:
    import pty

    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGD_")}
    env.update(SEGD_MODELS_DIR=str(models_dir), SEGD_EDGETPU_LIBRARY="/nonexistent/libedgetpu.so.1")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "segd", "bench", "--model", "deeplabv3_mnv2_dm05_pascal",
                             "--iterations", "2", "--warmup", "1"],
                            stdout=subprocess.PIPE, stderr=slave, env=env)  # fmt: skip
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(300)
    os.close(master)
    assert proc.returncode == 0
    assert b"bench: [" in seen and b"6/6  model=deeplabv3_mnv2_dm05_pascal stage=end-to-end" in seen


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


def test_the_cli_offers_every_cpu_runtime_and_starts_without_numpy() -> None:
    from segd.cli import CPU_RUNTIMES
    from segd.runtime.tpu_worker import RUNTIMES

    assert tuple(RUNTIMES) == CPU_RUNTIMES
    code = "import sys, segd.cli; sys.exit('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
