"""Pipelined Edge TPU path and several devices, measured without hardware (loopback, bounded).

The Edge TPU is segd's latency simulator: the test double (tests/edgetpu_double, built here with
gcc) in ``FAKE_EDGETPU_MODE=latency`` claims the model's ``edgetpu-custom-op`` node, sleeps T ms
per invoke and fills the output deterministically. Everything else is real: ``segd serve`` on
127.0.0.1, its supervised worker process per device, decode / resize / upsample + argmax / PNG
encode on the CPU. The simulator's output is not the model's, so the daemon runs with
``SEGD_RELAX_SIMULATED_TPU_SELFTEST=1`` (applies only to a library that names itself the simulator).

    python bench/tpu_scale.py [--invoke-ms 25] [--seconds 15] [--write]

Reports, per configuration: throughput, throughput x T (1.0 = the TPU never idles), the ratio of
2 devices to 1 in the same run, p50/p99 latency, and the CPU the daemon and its workers used
(cores busy) next to the machine's load average: where the CPU becomes the limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/tpu_scale.py`, bench/ comes first on sys.path and bench/http.py would
# shadow the standard library's `http` package: drop that entry before anything imports it.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse
import os
import tempfile
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from daemon import start_daemon  # tests/daemon.py starts the real server
from edgetpu_double.build import build_double

from bench.load import closed_loop
from bench.report import publish
from segd.synthetic import synthetic_jpeg
from segd.variants import default_models_dir, load_manifest, resolve_file

MODEL = "deeplabv3_mnv2_pascal"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(root: int) -> float:
    """user+system CPU seconds of ``root`` and its live child processes (the TPU workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == root or ppid == root:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def load(url: str, image: bytes, clients: int, seconds: float, pid: int) -> dict[str, Any]:
    """A closed-loop run, plus the CPU the daemon (and its workers) and the clients used."""
    cpu0, load0, own0 = cpu_seconds(pid), os.getloadavg()[0], os.times()
    row = closed_loop(url, image, clients, seconds=seconds,
                      ok=lambda r: r.status_code == 200 and r.headers.get("x-segd-backend") == "edgetpu")  # fmt: skip
    cpu = cpu_seconds(pid) - cpu0
    own = os.times()
    wall = row["wall"]
    return {
        **row,
        "cores": cpu / wall,
        "client_cores": ((own.user - own0.user) + (own.system - own0.system)) / wall,
        "cpu_ms_per_request": 1000 * cpu / max(1, row["requests"]),
        "loadavg": max(load0, os.getloadavg()[0]),
    }


def run(models_dir: Path, library: Path, devices: int, clients: list[int], invoke_ms: float,
        seconds: float, image: bytes, pipeline: int = 2) -> list[dict[str, Any]]:  # fmt: skip
    listed = ",".join(f"usb:/sys/bus/usb/devices/2-{i + 1}" for i in range(devices))
    env = {
        "SEGD_EDGETPU_LIBRARY": str(library),
        "FAKE_EDGETPU_MODE": "latency",
        "FAKE_EDGETPU_INVOKE_MS": str(invoke_ms),
        "FAKE_EDGETPU_DEVICES": listed,
        "SEGD_RELAX_SIMULATED_TPU_SELFTEST": "1",
        "SEGD_EDGETPU_PAIRING": "trust",  # the simulator is no libedgetpu build of the pairing table
        "SEGD_ACCELERATOR": "edgetpu",
        "SEGD_QUEUE_SIZE": "64",
        "SEGD_TPU_PIPELINE": str(pipeline),
    }
    if devices > 1:
        env["SEGD_DEVICES"] = "all"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp), models_dir, "--model", MODEL, env=env)
        try:
            load(daemon.url, image, 2, 2.0, daemon.proc.pid)  # warm-up
            for n in clients:
                row = load(daemon.url, image, n, seconds, daemon.proc.pid)
                row["devices"] = devices
                row["pipeline"] = pipeline
                rows.append(row)
        finally:
            daemon.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--invoke-ms", type=float, nargs="+", default=[25.0, 50.0],
                   help="simulated Edge TPU times T per invoke (one table block each)")
    p.add_argument("--seconds", type=float, default=15.0, help="load duration per row")
    p.add_argument("--write", action="store_true", help="update docs/PERFORMANCE.md")
    args = p.parse_args(argv)

    models_dir = Path(os.environ.get("SEGD_MODELS_DIR") or default_models_dir())
    variant = load_manifest(models_dir=models_dir).get(MODEL)
    for spec in variant.files():
        resolve_file(spec, models_dir)
    image = synthetic_jpeg((513, 513))
    lines = [
        f"Model `{MODEL}` on the simulated Edge TPU (T ms per invoke: at most 1000/T images/s per "
        f"device); 513x513 JPEG in, indexed PNG mask out; {os.cpu_count()} CPU cores; each row a "
        f"closed loop of N clients for {args.seconds:g} s. x T = images/s x T / devices (1.0 = every "
        "TPU always busy). CPU = cores busy in the daemon and its TPU workers (user+system); clients = "
        "the load generator's own CPU on the same cores. Pipelined no = `tpu_pipeline = 1` (one request "
        "in the worker at a time), the same run's baseline for the pipelining.",
        "",
        "| T ms | devices | pipelined | clients | requests | errors | images/s | x T | vs 1 device | p50 ms "
        "| p99 ms | CPU cores | CPU ms/image | clients' cores | load avg |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as build:
        library = build_double(build)
        for invoke_ms in args.invoke_ms:
            serial = run(models_dir, library, 1, [4], invoke_ms, args.seconds, image, pipeline=1)
            one = run(models_dir, library, 1, [4], invoke_ms, args.seconds, image)
            two = run(models_dir, library, 2, [4, 8], invoke_ms, args.seconds, image)
            base, t = one[0]["throughput"], invoke_ms / 1000.0
            for r in serial + one + two:
                rows.append(r)
                lines.append(
                    f"| {invoke_ms:g} | {r['devices']} | {'yes' if r['pipeline'] > 1 else 'no'} | "
                    f"{r['clients']} | {r['requests']} | {r['errors']} | "
                    f"{r['throughput']:.1f} | {r['throughput'] * t / r['devices']:.2f} | "
                    f"{r['throughput'] / base:.2f}x | {r['p50']:.1f} | {r['p99']:.1f} | {r['cores']:.2f} | "
                    f"{r['cpu_ms_per_request']:.1f} | {r['client_cores']:.2f} | {r['loadavg']:.1f} |"
                )
    lines += ["", "Reproduce: `.venv/bin/python bench/tpu_scale.py --write` (SEGD_MODEL_MIRROR or the "
              "manifest URLs supply the model files)."]  # fmt: skip
    text = "\n".join(lines)
    publish("Several Edge TPUs (simulated)", text, args.write)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
