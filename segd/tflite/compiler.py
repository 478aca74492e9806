"""Run Coral's ``edgetpu_compiler`` and read what it reports.

The compiler is a closed-source binary shipped only as the Debian package
``edgetpu-compiler`` from Coral's own apt repository, for x86-64 Linux. It is not on PyPI or in
Debian, does not exist for aarch64/armhf (so never on the Pi) and cannot be installed on this
project's build machines, which reach only PyPI, Debian and npm. ``compile_edgetpu`` therefore
runs it only when it is on ``PATH`` and otherwise raises ``EdgeTpuCompilerUnavailable`` saying
how to get it; ``parse_compiler_log`` works anywhere, on text the compiler printed elsewhere.

Two text shapes exist and both parse:
- stdout (with ``-s``): version, memory and op-count summary, then the operator table;
- the ``<model>_edgetpu.log`` file: version, input/output, then the operator table.
Without ``-s`` the compiler lists only unmapped operators and ends the table with
"... All other operators were mapped successfully"; ``CompileLog.table_complete`` is then False.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segd.errors import RuntimeUnavailable, SegdError

__all__ = [
    "INSTALL_HINT",
    "CompileLog",
    "CompileResult",
    "EdgeTpuCompileFailed",
    "EdgeTpuCompilerUnavailable",
    "LogRow",
    "compile_edgetpu",
    "parse_compiler_log",
]

COMPILER = "edgetpu_compiler"
MAPPED = "Mapped to Edge TPU"

INSTALL_HINT = (
    "edgetpu_compiler is not installed. It is distributed only as the Debian package "
    "'edgetpu-compiler' from Coral's apt repository and runs only on x86-64 Linux:\n"
    "  curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -\n"
    '  echo "deb https://packages.cloud.google.com/apt coral-edgetpu-stable main" | '
    "sudo tee /etc/apt/sources.list.d/coral-edgetpu.list\n"
    "  sudo apt-get update && sudo apt-get install edgetpu-compiler\n"
    "There is no aarch64/armhf build (it cannot run on a Raspberry Pi), it is not on PyPI or in "
    "Debian, and machines that reach only PyPI/Debian/npm cannot install it; compile on an "
    "x86-64 Linux host or in Coral's Colab notebook (google-coral/tutorials, "
    "compile_for_edgetpu.ipynb). segd.tflite.checker predicts the op mapping without it."
)


class EdgeTpuCompilerUnavailable(RuntimeUnavailable):
    """``edgetpu_compiler`` is not on PATH (and cannot be on ARM or on registry-only hosts)."""

    code = "edgetpu_compiler_unavailable"


class EdgeTpuCompileFailed(SegdError):
    """The compiler ran but did not produce a model (error exit, crash or timeout)."""

    code = "edgetpu_compile_failed"
    http_status = 422

    def __init__(self, detail: str, output: str = "") -> None:
        super().__init__(detail)
        self.output = output


@dataclass(frozen=True)
class LogRow:
    op: str
    count: int
    status: str

    @property
    def mapped(self) -> bool:
        return self.status == MAPPED


@dataclass(frozen=True)
class CompileLog:
    compiler_version: str | None
    input_model: str | None
    output_model: str | None
    ops_mapped: int | None
    ops_total: int | None
    subgraphs: int | None
    #: Bytes, as the compiler rounds them (it prints e.g. "6.08MiB").
    on_chip_memory_used: int | None
    on_chip_memory_remaining: int | None
    off_chip_memory: int | None
    rows: list[LogRow] = field(default_factory=list)
    #: False when the compiler listed only the unmapped operators.
    table_complete: bool = True
    #: True/False when the text says "Compilation succeeded!/failed!", else None.
    succeeded: bool | None = None

    @property
    def ops_on_cpu(self) -> int | None:
        if self.ops_total is None or self.ops_mapped is None:
            return None
        return self.ops_total - self.ops_mapped


@dataclass(frozen=True)
class CompileResult:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    model_path: Path
    log_path: Path | None
    log: CompileLog


_UNITS = {"B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2}
_ROW = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]*)\s+(?P<count>\d+)\s+(?P<status>\S.*?)\s*$")


def _size(text: str) -> int | None:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?i?B)\s*", text, flags=re.IGNORECASE)
    if not m:
        return None
    return round(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _field(text: str, label: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(label)}:\s*(.+?)\s*$", text, flags=re.MULTILINE)
    return m.group(1) if m else None


def _int_field(text: str, label: str) -> int | None:
    value = _field(text, label)
    return int(value) if value is not None and value.isdigit() else None


def parse_compiler_log(text: str) -> CompileLog:
    """Parse ``edgetpu_compiler`` stdout or its ``.log`` file (the first model's section)."""
    version = re.search(r"Edge TPU Compiler version\s+(\S+)", text)
    rows: list[LogRow] = []
    complete = True
    header = re.search(r"^\s*Operator\s+Count\s+Status\s*$", text, flags=re.MULTILINE)
    if header:
        for line in text[header.end() :].splitlines():
            if not line.strip():
                continue
            if "All other operators were mapped successfully" in line:
                complete = False
                break
            m = _ROW.match(line.strip())
            if not m:
                if rows:
                    break  # the table ended ("Compilation child process completed ...")
                continue
            rows.append(LogRow(m.group("op"), int(m.group("count")), m.group("status")))

    total = _int_field(text, "Total number of operations")
    on_tpu = _int_field(text, "Number of operations that will run on Edge TPU")
    on_cpu = _int_field(text, "Number of operations that will run on CPU")
    table_total = sum(r.count for r in rows)
    table_mapped = sum(r.count for r in rows if r.mapped)
    if total is None and rows and complete:
        total = table_total
    if on_tpu is None:
        if total is not None and on_cpu is not None:
            on_tpu = total - on_cpu
        elif rows and complete:
            on_tpu = table_mapped
    succeeded: bool | None = None
    if re.search(r"Compilation succeeded!", text):
        succeeded = True
    elif re.search(r"Compilation failed", text):
        succeeded = False

    def size(label: str) -> int | None:
        value = _field(text, label)
        return _size(value) if value is not None else None

    return CompileLog(
        compiler_version=version.group(1) if version else None,
        input_model=_field(text, "Input model") or _field(text, "Input"),
        output_model=_field(text, "Output model") or _field(text, "Output"),
        ops_mapped=on_tpu,
        ops_total=total,
        subgraphs=_int_field(text, "Number of Edge TPU subgraphs"),
        on_chip_memory_used=size("On-chip memory used for caching model parameters"),
        on_chip_memory_remaining=size("On-chip memory remaining for caching model parameters"),
        off_chip_memory=size("Off-chip memory used for streaming uncached model parameters"),
        rows=rows,
        table_complete=complete,
        succeeded=succeeded,
    )


def compile_edgetpu(
    path: str | Path,
    out_dir: str | Path,
    *,
    timeout: float = 600.0,
    extra_args: Sequence[str] = (),
) -> CompileResult:
    """Compile ``path`` into ``out_dir`` with ``edgetpu_compiler -s``; parse its report.

    Raises EdgeTpuCompilerUnavailable when the compiler is not on PATH, and
    EdgeTpuCompileFailed when it exits with an error, times out or writes no model.
    """
    exe = shutil.which(COMPILER)
    if exe is None:
        raise EdgeTpuCompilerUnavailable(INSTALL_HINT)
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = [exe, "-s", "-o", str(out), *extra_args, str(src)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout if isinstance(exc.stdout, str) else ""
        raise EdgeTpuCompileFailed(f"{COMPILER} timed out after {timeout:.0f} s", partial) from exc
    log = parse_compiler_log(proc.stdout)
    model_path = out / f"{src.stem}_edgetpu.tflite"
    log_path = out / f"{src.stem}_edgetpu.log"
    if proc.returncode != 0 or log.succeeded is False or not model_path.is_file():
        raise EdgeTpuCompileFailed(
            f"{COMPILER} failed (exit {proc.returncode}): "
            + (proc.stderr.strip() or proc.stdout.strip())[-2000:],
            proc.stdout + proc.stderr,
        )
    return CompileResult(
        command=command,
        returncode=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
        model_path=model_path,
        log_path=log_path if log_path.is_file() else None,
        log=log,
    )
