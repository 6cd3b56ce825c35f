"""The progress line of long commands: what it says, and that only a terminal gets it."""

from __future__ import annotations

import io

import pytest

from pipeline.commands.worker_progress import remaining
from pipeline.progress import Progress, render

# -- the progress line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("producing", 250, 1000, "events", 5.0),
            "producing: 250/1,000 events (25 %), 50 events/s, ETA 0:15",
        ),
        (("producing", 0, 1000, "events", 0.0), "producing: 0/1,000 events (0 %)"),
        (("worker", 12_000, None, "events", 4.0), "worker: 12,000 events, 3,000 events/s"),
        (
            ("checking", 40_000_000, 80_000_000, "bytes", 2.0),
            "checking: 40.0/80.0 MB (50 %), 20.0 MB/s, ETA 0:02",
        ),
        (
            ("rating calls", 1, 7_200_001, "calls", 1.0),
            "rating calls: 1/7,200,001 calls (0 %), 1 calls/s, ETA 2000:00:00",
        ),
        (("waiting for the broker", 0, None, "", 3.0), "waiting for the broker"),
    ],
)
def test_the_progress_line(args: tuple[str, int, int | None, str, float], line: str) -> None:
    assert render(*args) == line


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_writes_nothing_when_stderr_is_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out)
    progress.phase("producing", 10)
    progress.update(10)
    progress.close()
    assert out.getvalue() == ""


def test_progress_on_a_terminal_redraws_in_place_and_erases_itself() -> None:
    now = [0.0]
    out = _Tty()
    progress = Progress(out, clock=lambda: now[0])
    progress.phase("producing", 100)
    now[0] = 0.1
    progress.update(10)  # within the redraw interval: skipped
    now[0] = 1.0
    progress.update(50)
    now[0] = 2.0
    progress.update(100)  # the last one is always drawn
    progress.close()
    assert out.getvalue().split("\r\x1b[K") == [
        "",
        "producing: 0/100 events (0 %)",
        "producing: 50/100 events (50 %), 50 events/s, ETA 0:01",
        "producing: 100/100 events (100 %), 50 events/s, ETA 0:00",
        "",
    ]


def test_remaining_records_count_from_the_committed_offset_or_the_start() -> None:
    ends = {("calls", 0): (0, 100), ("calls", 1): (10, 50), ("calls", 2): (0, 0)}
    assert remaining(ends, {("calls", 0): 40, ("calls", 1): -1}) == 60 + 40
