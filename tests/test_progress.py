"""The one progress line: drawn in place on a terminal, silent in logs unless asked."""

from __future__ import annotations

import io

from segd.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_line_redrawn_in_place_then_the_message() -> None:
    out = Tty()
    bar = Progress("m.tflite", unit="MB", stream=out)
    bar(1_000_000, 4_000_000)
    bar(4_000_000, 4_000_000)
    bar.close("m.tflite ok")
    text = out.getvalue()
    assert text.count("\r") >= 3 and "25.0% 1.0/4.0 MB" in text and "100.0% 4.0/4.0 MB" in text
    assert text.endswith("\r\033[Km.tflite ok\n")


def test_a_log_gets_only_the_results() -> None:
    out = io.StringIO()
    bar = Progress("train", unit="steps", total=10, stream=out)
    bar.step(loss="0.5")
    bar.write("step 1: val mIoU 0.1")
    bar.close("done")
    assert out.getvalue() == "done\n"


def test_shown_on_request_with_notes_and_lines_above_it() -> None:
    out = io.StringIO()
    bar = Progress("train", unit="steps", total=4, done=1, show=True, stream=out)
    bar.step(loss="0.5")
    bar.write("step 2: val mIoU 0.1")
    bar.close()
    text = out.getvalue()
    assert "50.0% 2/4 steps  loss=0.5" in text and "\r\033[Kstep 2: val mIoU 0.1\n" in text
