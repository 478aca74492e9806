"""A one-line progress bar on stderr, drawn only when stderr is a terminal (logs and pipes get
no carriage-return noise). Used by downloads, ``segd segment`` over many files, ``segd bench``."""

from __future__ import annotations

import sys
from typing import TextIO


class Bar:
    """``bar(done, total)`` redraws; ``bar.done(message)`` clears the bar and prints a line.
    ``unit="MB"`` shows byte counts in megabytes, ``""`` plain counts."""

    def __init__(self, label: str, unit: str = "", stream: TextIO | None = None) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.note = ""

    def _amount(self, n: int) -> str:
        return f"{n / 1e6:.1f} MB" if self.unit == "MB" else str(n)

    def __call__(self, done: int, total: int = 0, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        if not self.tty:
            return
        tail = f" {self.note}" if self.note else ""
        if total:
            frac = min(1.0, done / total)
            bar = "#" * int(frac * 30)
            count = f"{frac * 100:5.1f}% {self._amount(done)}" if self.unit else f"{done}/{total}"
            line = f"{self.label}: [{bar:30}] {count}{tail}"
        else:
            line = f"{self.label}: {self._amount(done)}{tail}"
        self.stream.write("\r\033[K" + line[:200])
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def done(self, message: str) -> None:
        self.clear()
        print(message, file=self.stream)
