"""Build the Edge TPU test double (``fake_edgetpu.c``) into a drop-in ``libedgetpu.so.1``.

The double is a real shared library that the real runtimes load through the real delegate
plugin interface; only the hardware behind it is simulated (see the header of the C file).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "fake_edgetpu.c"
LIBRARY_NAME = "libedgetpu.so.1"


def compiler() -> str | None:
    """The C compiler to use, or None when none is installed."""
    return shutil.which("gcc") or shutil.which("cc")


def c_string(text: str) -> str:
    """``text`` as a C string literal for a -D define (passed without a shell)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_double(out_dir: Path | str, version: str | None = None) -> Path:
    """Compile the double into ``out_dir/libedgetpu.so.1`` and return its path. ``version``:
    what its ``edgetpu_version()`` reports unless FAKE_EDGETPU_VERSION says otherwise (a
    compile-time define, so each variant is its own file with its own sha256)."""
    cc = compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler (gcc/cc) on PATH")
    out = Path(out_dir) / LIBRARY_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        cc,
        "-std=c11",
        "-D_DEFAULT_SOURCE",
        "-O1",
        "-g",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-Wall",
        "-Wextra",
        "-Werror",
        *([f"-DFAKE_EDGETPU_DEFAULT_VERSION={c_string(version)}"] if version is not None else []),
        "-Wl,-soname," + LIBRARY_NAME,
        "-o",
        str(out),
        str(SOURCE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"building the Edge TPU double failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return out
