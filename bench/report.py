"""Write a benchmark's markdown table into its own section of docs/PERFORMANCE.md, between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` markers, so each bench updates only its part."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = f"_Measured {datetime.date.today().isoformat()} on {machine()}._\n\n"
    block = f"{start}\n{stamp}{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + f"\n\n## {name}\n\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def publish(name: str, text: str, write: bool, doc: Path = DOC) -> None:
    """Print a benchmark's report; with ``--write`` also put it in its section of ``doc``."""
    print(text)
    if write:
        write_section(name, text, doc)
