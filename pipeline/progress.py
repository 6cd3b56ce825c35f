"""A progress line for long commands (produce, worker --until-idle, invoice): on stderr, redrawn in
place, and only when stderr is a terminal. Logs, pipes and CI get nothing from it, so a captured run
reads the same as before and scripts never parse a half-drawn line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_CLEAR = "\r\x1b[K"


def _count(n: float, unit: str) -> str:
    if unit == "bytes":
        return f"{n / 1e6:,.1f} MB"
    return f"{n:,.0f} {unit}"


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def render(label: str, done: int, total: int | None, unit: str, elapsed_seconds: float) -> str:
    """The line itself: what, how far, how fast and (with a total) when it ends.

    >>> render("producing", 250, 1000, "events", 5.0)
    'producing: 250/1,000 events (25 %), 50 events/s, ETA 0:15'
    """
    if not unit:
        return label  # a step with nothing to count
    rate = done / elapsed_seconds if elapsed_seconds > 0 else 0.0
    if unit == "bytes":
        speed = f"{rate / 1e6:,.1f} MB/s"
        shown = f"{done / 1e6:,.1f}/{_count(total, unit)}" if total else _count(done, unit)
    else:
        speed = f"{rate:,.0f} {unit}/s"
        shown = f"{done:,}/{_count(total, unit)}" if total else _count(done, unit)
    parts = [f"{label}: {shown}"]
    if total:
        parts[0] += f" ({min(100, 100 * done // total)} %)"
    if done > 0 and elapsed_seconds > 0:
        parts.append(speed)
        if total and rate > 0:
            parts.append(f"ETA {_duration(max(total - done, 0) / rate)}")
    return ", ".join(parts)


class Progress:
    """``update()`` as often as you like; the line is redrawn at most every ``interval`` seconds.
    ``phase()`` starts a new measured step (its rate and ETA are its own). ``close()`` erases the line."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.interval = interval
        self.clock = clock
        self.label = ""
        self.unit = "events"
        self.total: int | None = None
        self.started = clock()
        self._drawn_at = float("-inf")
        self._shown = False

    def phase(self, label: str, total: int | None = None, unit: str = "events") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.started = self.clock()
        self._drawn_at = float("-inf")
        self.update(0)

    def update(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        if total is not None:
            self.total = total
        now = self.clock()
        if now - self._drawn_at < self.interval and done != self.total:
            return
        self._drawn_at = now
        line = render(self.label, done, self.total, self.unit, now - self.started)
        self.stream.write(_CLEAR + line)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the line, so what the command prints next starts on a clean line."""
        if self.enabled and self._shown:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self._shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def disabled() -> Progress:
    return Progress(enabled=False)
