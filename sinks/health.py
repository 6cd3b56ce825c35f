"""How the ledger sink of this process is doing, for the ``/status`` of the process that runs it (a
stream worker with the sink inside, or the sink process) and so for `callmeter status`.

The sink records each write and each failed attempt here. A sink retrying a batch the ledger refuses
is alive and answers, but writes nothing: ``failing_since_unix`` (the first failed attempt of that
batch) and ``last_error`` tell on-call so, instead of a sink that looks idle.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class SinkHealth:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows_written = 0
        self.batches = 0
        self.last_write_unix: float | None = None
        self.failing_since_unix: float | None = None
        self.failed_attempts = 0
        self.insert_errors = 0
        self.last_error: str | None = None
        self.stopped_error: str | None = None

    def wrote(self, rows: int) -> None:
        with self._lock:
            self.rows_written += rows
            self.batches += 1
            self.last_write_unix = time.time()
            self.failing_since_unix = None
            self.failed_attempts = 0

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self.failing_since_unix = self.failing_since_unix or time.time()
            self.failed_attempts += 1
            self.insert_errors += 1
            self.last_error = _one_line(error)

    def stopped(self, error: BaseException) -> None:
        with self._lock:
            self.stopped_error = _one_line(error)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rows_written": self.rows_written,
                "batches": self.batches,
                "last_write_unix": self.last_write_unix,
                "failing_since_unix": self.failing_since_unix,
                "failed_attempts": self.failed_attempts,
                "insert_errors": self.insert_errors,
                "last_error": self.last_error,
                "stopped_error": self.stopped_error,
            }


# The sink this process runs, if any (at most one: chdb lets one process open the ledger).
_running: list[SinkHealth] = []


def register(health: SinkHealth) -> None:
    _running[:] = [health]


def unregister(health: SinkHealth) -> None:
    if _running and _running[0] is health:
        _running.clear()


def running_sink_status() -> dict[str, Any] | None:
    """The ``sink`` part of this process's ``/status``: None when this process runs no sink."""
    return _running[0].to_dict() if _running else None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text or type(error).__name__)[:300]
