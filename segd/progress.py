"""One progress line on stderr for every long command (model downloads, ``segd eval``,
``segd train``): redrawn in place with ``\\r``; by default drawn only when stderr is a
terminal, so logs and pipes get the results, not the animation."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """``progress(done, total, **notes)``; ``write(text)`` prints a line above it; ``close()``.

    ``unit="MB"`` shows byte counts in megabytes; any other unit is a plain count. ``show``:
    True always, False never, None (default) when the stream is a terminal.
    """

    WIDTH = 30

    def __init__(
        self, label: str, *, unit: str = "", total: int = 0, done: int = 0,
        show: bool | None = None, stream: TextIO | None = None,
    ) -> None:  # fmt: skip
        self.label, self.unit, self.total, self.done = label, unit, total, done
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if show is None else show
        self.drawn = False

    def _amount(self, n: int) -> str:
        return f"{n / 1e6:.1f}" if self.unit == "MB" else str(n)

    def __call__(self, done: int, total: int | None = None, **notes: str) -> None:
        self.done = done
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        text = f"\r{self.label}: "
        if self.total:
            frac = min(1.0, done / self.total)
            text += f"[{'#' * int(frac * self.WIDTH):{self.WIDTH}}] {frac * 100:5.1f}% "
            text += f"{self._amount(done)}/{self._amount(self.total)}"
        else:
            text += self._amount(done)
        if self.unit:
            text += f" {self.unit}"
        if notes:
            text += "  " + " ".join(f"{k}={v}" for k, v in notes.items())
        self.stream.write(text + "\033[K")
        self.stream.flush()
        self.drawn = True

    def step(self, **notes: str) -> None:
        """One more unit done."""
        self(self.done + 1, None, **notes)

    def write(self, text: str) -> None:
        """A line of its own when the bar is shown (it is redrawn on the next update)."""
        if not self.enabled:
            return
        if self.drawn:
            self.stream.write("\r\033[K")
            self.drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, message: str | None = None) -> None:
        """Clear the line, then print ``message`` (always, terminal or not) if given."""
        if self.drawn:
            self.stream.write("\r\033[K" if message else "\n")
            self.drawn = False
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
