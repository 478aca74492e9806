"""A second virtualenv for the Edge TPU worker: numpy<2 and tflite-runtime 2.14.0 from PyPI
(the newest tflite-runtime for this machine's Python), next to the daemon's ai-edge-litert +
numpy 2 — the split a real Pi needs when libedgetpu's paired runtime wants numpy 1.x.

Created on first use under ``<repo>/.cache/`` (pip's cache makes later creations fast);
``scripts/setup test`` runs this file so CI has it before the tests start:

    .venv/bin/python tests/tpu_venv.py
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIME = "tflite-runtime==2.14.0"
NUMPY = "numpy<2"
CHECK = (
    "import numpy, tflite_runtime, tflite_runtime.interpreter; "
    "assert numpy.__version__.startswith('1.'), numpy.__version__; "
    "print(numpy.__version__, tflite_runtime.__version__)"
)


def venv_dir() -> Path:
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return REPO / ".cache" / f"tpu-venv-{tag}-{RUNTIME.replace('==', '-')}"


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    proc = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, check=False)
    return proc.returncode == 0


def tpu_python() -> Path:
    """The second venv's python, created if missing (one creator at a time: a lock file)."""
    target = venv_dir()
    python = target / "bin" / "python"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _works(python):
            return python
        shutil.rmtree(target, ignore_errors=True)
        # venv's own pip from the base interpreter; then the two pinned packages
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        NUMPY, RUNTIME], check=True)  # fmt: skip
        if not _works(python):
            raise RuntimeError(f"{target}: {RUNTIME} with {NUMPY} does not import")
        return python


if __name__ == "__main__":
    print(tpu_python())
