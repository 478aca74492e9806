"""The target suite: what scripts/test-target runs inside an emulated arm64 Raspberry Pi OS
rootfs, with the segd installed there from aarch64 wheels.

Standard library only (plus the segd it tests, through its CLI and HTTP API), so it runs on the
target's own Python. Each check prints one line ``CHECK <name> pass|fail <seconds> <detail>``;
scripts/test-target collects them into its summary table. Exit status: the number of failures
(capped at 100).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

SEGD = Path(sys.prefix) / "bin" / "segd"
# Reference images and the variant that segments each (the Coral test data's own pairs).
REFERENCE = {
    "bird.bmp": "deeplabv3_mnv2_pascal",
    "cat.bmp": "deeplabv3_mnv2_pascal",
    "cityscapes_segmentation.bmp": "deeplab_edgetpu_slim_cityscapes",
}
# The stand-in Edge TPU variant: tests/data/tpu_variant.toml, which scripts/test-target copies
# beside this file in the rootfs (read when used: compare_masks.py imports this module on the host).
TPU_TOML = Path(__file__).parent / "tpu_variant.toml"

failures = 0


def check(name: str, fn: Callable[[], str]) -> None:
    """Run one check and print its result line (a failure is printed, never raised)."""
    global failures
    start = time.monotonic()
    try:
        detail = fn() or ""
        status = "pass"
    except Exception as exc:
        failures += 1
        status = "fail"
        detail = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    secs = time.monotonic() - start
    detail = " ".join(detail.split())[:300]  # one line for the summary table
    print(f"CHECK {name} {status} {secs:.1f} {detail}".rstrip(), flush=True)


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    proc = subprocess.run([str(SEGD), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"segd {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, ctype: str | None = None,
         timeout: float = 300) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    req = urllib.request.Request(url, data=body, method=method)
    if ctype:
        req.add_header("content-type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class Daemon:
    """``segd serve`` on a free loopback port, started and stopped as a user would."""

    def __init__(self, models: Path, log: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Emulation is 10-30x slower than a Pi: the default 30 s per request and 5 s per Edge TPU
        # invoke would time out (and be reported as such) on a busy 2-core host.
        full_env = dict(os.environ, SEGD_MODELS_DIR=str(models), SEGD_REQUEST_TIMEOUT="600",
                        SEGD_TPU_TIMEOUT="120", **(env or {}))  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen([str(SEGD), "serve", "--port", str(self.port), *args],
                                     env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip

    def wait_ready(self, timeout: float = 600) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"segd serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                status, _, _ = http("GET", self.url + "/readyz", timeout=5)
                if status == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"/readyz not 200 after {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("segd serve did not stop within 60 s of SIGTERM") from None
        return self.proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True, help="the reference images and model files")
    ap.add_argument("--out", type=Path, required=True, help="masks and logs go here")
    ap.add_argument("--double", type=Path, required=True, help="the aarch64 Edge TPU double")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    data: Path = args.data

    def platform_is_arm() -> str:
        import platform

        machine = platform.machine()
        assert machine == "aarch64", machine
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        assert "CPU implementer\t: 0x41" in first, "the ARM cpuinfo is not in place"
        return f"{machine}, Python {platform.python_version()}"

    def models_pull() -> str:
        # The variants whose files the Coral test data holds (the manifest has others).
        wanted = sorted({*REFERENCE.values(), "deeplabv3_mnv2_dm05_pascal"})
        run("models", "pull", *wanted, "--models-dir", str(models), "--mirror", str(data))
        return f"{len(list(models.glob('*.tflite')))} model files fetched from the mirror, sha256-checked"

    def segment_cli() -> str:
        # One reference image through `segd segment` (a process per image is slow under
        # emulation); the others go through the server below. All masks are compared with x86's.
        image = "bird.bmp"
        env = dict(os.environ, SEGD_MODELS_DIR=str(models))
        run("segment", str(data / image), "--model", REFERENCE[image], "--format", "png",
            "-o", str(out / f"{Path(image).stem}.png"), env=env)  # fmt: skip
        return f"{image} -> {Path(image).stem}.png"

    def doctor() -> str:
        env = dict(os.environ, SEGD_MODELS_DIR=str(models), SEGD_EDGETPU_LIBRARY="/nonexistent/libedgetpu.so.1")
        proc = subprocess.run([str(SEGD), "doctor"], capture_output=True, text=True, env=env, check=False, timeout=600)
        (out / "doctor.txt").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"doctor exited {proc.returncode}: {proc.stdout[-1500:]}"
        assert "aarch64" in proc.stdout and "libedgetpu" in proc.stdout, proc.stdout[-1500:]
        return proc.stdout.strip().splitlines()[-1]

    def serve_every_route() -> str:
        served = sorted(set(REFERENCE.values()))
        d = Daemon(models, out / "serve.log", *(f"--model={m}" for m in served),
                   env={"SEGD_EDGETPU_LIBRARY": "/nonexistent/libedgetpu.so.1"})  # fmt: skip
        try:
            warm = d.wait_ready()
            bird = (data / "bird.bmp").read_bytes()
            seen = []
            for path, want in [("/healthz", 200), ("/readyz", 200), ("/models", 200),
                               ("/models/deeplabv3_mnv2_pascal", 200), ("/models/nope", 404),
                               ("/metrics", 200), ("/", 200), ("/openapi.json", 200)]:  # fmt: skip
                status, _, body = http("GET", d.url + path)
                assert status == want, f"GET {path}: {status} {body[:300]!r}"
                seen.append(path)
            info = json.loads(http("GET", d.url + "/models/deeplabv3_mnv2_pascal")[2])
            assert info["backend"] == "cpu" and "libedgetpu" in info["reason"], info
            assert http("GET", d.url + f"/models/{served[0]}")[0] == 200
            page = http("GET", d.url + "/")[2].decode()
            for static in sorted({p.split('"')[0] for p in page.split('src="/static/')[1:]}):
                status, _, _ = http("GET", d.url + "/static/" + static)
                assert status == 200, f"/static/{static}: {status}"
                seen.append("/static/" + static)
            for fmt, ctype in [("png", "image/png"), ("json", "application/json"), ("overlay", "image/jpeg")]:
                status, headers, body = http("POST", d.url + f"/segment?format={fmt}", bird, "image/bmp")
                assert status == 200 and headers["content-type"].startswith(ctype), (status, headers, body[:300])
                assert headers["x-segd-backend"] == "cpu"
                seen.append(f"POST /segment?format={fmt}")
            for image, variant in REFERENCE.items():
                if image == "bird.bmp":
                    continue  # segd segment made that one
                status, headers, body = http("POST", d.url + f"/segment?model={variant}&format=png",
                                             (data / image).read_bytes(), "image/bmp")  # fmt: skip
                assert status == 200 and headers["x-segd-model"] == variant, (status, headers)
                (out / f"{Path(image).stem}.png").write_bytes(body)
                seen.append(f"POST /segment?model={variant}")
            status, _, body = http("POST", d.url + "/segment", b"not an image", "image/png")
            assert 400 <= status < 500 and "error" in json.loads(body), (status, body[:300])
            metrics = http("GET", d.url + "/metrics")[2].decode()
            assert "segd_" in metrics
        finally:
            code = d.stop()
        assert code == 0, f"segd serve exited {code} on SIGTERM"
        return f"ready in {warm:.0f}s; {len(seen)} routes; bad upload {status}; SIGTERM exit 0"

    def edgetpu_worker_with_double() -> str:
        tpu_models = out / "tpu_models"
        shutil.copytree(models, tpu_models, dirs_exist_ok=True)
        # The double claims graph nodes and runs them with TFLite's own kernels, so the DM0.5 CPU
        # file stands in for an Edge TPU file (as in tests/test_edgetpu_serving.py).
        cpu_file = "deeplabv3_mnv2_dm05_pascal_quant.tflite"
        sha = hashlib.sha256((tpu_models / cpu_file).read_bytes()).hexdigest()
        (tpu_models / "tpu.toml").write_text(TPU_TOML.read_text().format(name=cpu_file, sha=sha))
        # segd loads only a libedgetpu its pairings table vouches for: register the double by its
        # sha256, as a user registers their own build (SEGD_EDGETPU_PAIRINGS).
        lib_sha = hashlib.sha256(args.double.read_bytes()).hexdigest()
        pairings = out / "pairings.toml"
        pairings.write_text(
            f'[[build]]\nid = "test-double-{lib_sha[:8]}"\nname = "the aarch64 Edge TPU test double"\n'
            f'sha256 = ["{lib_sha}"]\n[[build.pairing]]\nruntime = "*"\nversions = "*"\nverdict = "good"\n'
            'note = "tests/edgetpu_double implements the C delegate ABI"\nsources = ["tests/edgetpu_double/fake_edgetpu.c"]\n'
        )
        # 1 warm-up invoke + 2 good requests in the worker process, then the delegate aborts it.
        env = {"SEGD_EDGETPU_LIBRARY": str(args.double), "FAKE_EDGETPU_DEVICES": "usb:/sys/bus/usb/devices/2-1",
               "SEGD_EDGETPU_PAIRINGS": str(pairings),
               "FAKE_EDGETPU_MODE": "crash_on_invoke", "FAKE_EDGETPU_CRASH_AFTER": "3",
               "SEGD_WORKER_RESTART_BASE": "0.2", "SEGD_TPU_FALLBACK": "cpu"}  # fmt: skip
        d = Daemon(tpu_models, out / "tpu.log", "--model", "tpu_dm05", env=env)
        try:
            warm = d.wait_ready()
            info = json.loads(http("GET", d.url + "/models/tpu_dm05")[2])
            assert info["backend"] == "edgetpu" and info["reason"].startswith("Edge TPU found"), info
            assert info["worker"]["pid"] != d.proc.pid, info["worker"]
            bird = (data / "bird.bmp").read_bytes()
            backends = []
            for _ in range(3):
                status, headers, _ = http("POST", d.url + "/segment", bird, "image/bmp")
                assert status == 200, status
                backends.append(headers["x-segd-backend"])
            deadline = time.monotonic() + 300
            while (worker := json.loads(http("GET", d.url + "/models/tpu_dm05")[2])["worker"])["state"] != "ready":
                assert time.monotonic() < deadline, worker
                time.sleep(1)
        finally:
            code = d.stop()
        assert code == 0, f"exit {code}"
        assert backends == ["edgetpu", "edgetpu", "cpu"], backends
        assert worker["restarts"] >= 1 and "SIGABRT" in worker["last_crash"], worker
        return f"ready in {warm:.0f}s; backends {backends}: worker aborted -> CPU twin answered, worker restarted"

    def fallback_no_device() -> str:
        env = {"SEGD_EDGETPU_LIBRARY": str(args.double), "FAKE_EDGETPU_DEVICES": ""}
        d = Daemon(models, out / "nodevice.log", "--model", "deeplabv3_mnv2_dm05_pascal", env=env)
        try:
            d.wait_ready()
            info = json.loads(http("GET", d.url + "/models/deeplabv3_mnv2_dm05_pascal")[2])
            assert info["backend"] == "cpu" and info["reason"].startswith("no Edge TPU found"), info
            fail_env = dict(os.environ, SEGD_MODELS_DIR=str(models), SEGD_EDGETPU_LIBRARY=str(args.double),
                            FAKE_EDGETPU_DEVICES="", SEGD_ACCELERATOR="edgetpu")  # fmt: skip
            proc = subprocess.run([str(SEGD), "segment", str(data / "bird.bmp"), "--model", "deeplabv3_mnv2_dm05_pascal",
                                   "--accelerator", "edgetpu"], capture_output=True, text=True, env=fail_env, timeout=600, check=False)  # fmt: skip
            assert proc.returncode != 0 and "Edge TPU" in proc.stderr, (proc.returncode, proc.stderr[-500:])
        finally:
            code = d.stop()
        assert code == 0, f"exit {code}"
        return f"no device -> cpu ({info['reason'][:60]}); --accelerator edgetpu refused"

    check("platform", platform_is_arm)
    check("models-pull", models_pull)
    check("segment-cli", segment_cli)
    check("doctor", doctor)
    check("serve-routes", serve_every_route)
    check("edgetpu-double", edgetpu_worker_with_double)
    check("fallback", fallback_no_device)
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
