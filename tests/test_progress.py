"""The one progress bar (coopkit.runtime.progress): redrawn in a terminal, a plain line at most
every few seconds elsewhere (a log file, a pipe), nothing when disabled. Torch-free."""

from __future__ import annotations

import io
import time

import pytest

from coopkit.runtime.progress import LOG_INTERVAL_S, LineProgress, progress_bar


class Terminal(io.StringIO):
    """A stream that says it is a terminal (what tqdm and progress_bar ask)."""

    def isatty(self) -> bool:
        return True


def test_in_a_terminal_the_bar_redraws_in_place():
    tqdm = pytest.importorskip("tqdm")
    out = Terminal()
    bar = progress_bar(range(200), desc="training", unit="epoch", file=out)
    assert isinstance(bar, tqdm.tqdm)
    for _ in bar:
        time.sleep(0.0005)  # long enough for tqdm to redraw several times (its mininterval is 0.1 s)
    text = out.getvalue()
    assert "training" in text and "200/200" in text
    assert text.count("\r") >= 2, "a terminal bar is redrawn in place with carriage returns"


def test_not_a_terminal_writes_one_line_at_the_end_within_the_interval():
    out = io.StringIO()
    bar = progress_bar(range(500), desc="training", unit="epoch", file=out)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines  # hundreds of steps within 10 s: only the closing line
    assert lines[0].startswith("training: 500/500 epoch (100%)")
    assert "\r" not in out.getvalue()


def test_not_a_terminal_writes_a_line_per_interval_and_none_twice_for_the_same_count():
    out = io.StringIO()
    bar = progress_bar(total=6, desc="predict", unit="img", file=out, interval=0.0)  # every update is due
    for _ in range(3):
        bar.update(2)
    bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["predict: 2/6 img (33%)", "predict: 4/6 img (67%)",
                                                      "predict: 6/6 img (100%)"]
    assert "loss" not in lines[-1]  # the postfix shows from the next line on; close wrote nothing new


def test_the_interval_spaces_the_lines():
    out = io.StringIO()
    bar = progress_bar(desc="predict", unit="img", file=out, interval=0.05, initial=10)
    deadline = time.monotonic() + 0.3
    n = 0
    while time.monotonic() < deadline:
        bar.update(1)
        n += 1
    bar.close()
    lines = out.getvalue().splitlines()
    assert n > 100 and 2 <= len(lines) <= 8, (n, lines)  # about one per 0.05 s, never one per update
    assert lines[-1].startswith(f"predict: {10 + n} img")  # a resumed count starts at ``initial``
    assert LOG_INTERVAL_S >= 5  # the default spacing is a few seconds


def test_disabled_writes_nothing_and_still_iterates():
    out = Terminal()
    bar = progress_bar(range(5), desc="x", enabled=False, file=out)
    assert list(bar) == [0, 1, 2, 3, 4]
    bar.set_postfix(loss=1.0)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
