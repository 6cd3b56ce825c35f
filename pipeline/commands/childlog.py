"""What a supervised worker process wrote on stderr, passed on as it comes and kept for the last line.

`callmeter worker` used to let its processes write to the terminal directly and ended a failed run
with "see the reasons above": with the broker gone for good, the reason ("no local broker running")
was buried under retries; with the disk full, the last line was a Kafka commit error that followed
from it, while "No space left on device" appeared only earlier. Each process's stderr now goes
through the supervisor line by line, unchanged, and the supervisor keeps what it needs to name the
cause of a failure on the run's last line (``cause``):

1. a line naming an exhausted or refused resource (a full disk, a read-only file system, permissions,
   open files, memory): what followed from it (a failed commit, a fenced producer) is not the cause;
2. otherwise the process's last ``callmeter: error:`` line, without its "restarting"/"retrying" tail;
3. otherwise how it ended (an exit code, a signal).
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from typing import IO

ERROR_PREFIX = "callmeter: error: "
# strerror texts of the OS errors that name their own cause (errno ENOSPC, EDQUOT, EROFS, EACCES,
# EPERM, EMFILE, ENFILE, ENOMEM): whatever fails after one of them is a consequence.
RESOURCE_ERRORS = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "Operation not permitted",
    "Too many open files",
    "Cannot allocate memory",
)
_TAILS = ("; restarting from the last commit", "; retrying")
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+|^\S+ \S+ (WARNING|ERROR|CRITICAL) \S+: ")
_TERMINAL = re.compile(r"\x1b\[\?25[hl]|\x08")
_write_lock = threading.Lock()
MAX_CAUSE_CHARS = 300


def write_line(text: str) -> None:
    """One line to stderr, never interleaved with a process's line passed on at the same moment."""
    with _write_lock:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()


class ChildLog:
    """Passes one process's stderr on (a thread per process) and remembers its error lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.errors: list[str] = []
        self.resource: str | None = None
        self._thread = threading.Thread(target=self._pump, args=(stream,), name="child-stderr", daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            # Faust's console spinner hides the cursor and backspaces even into a pipe: without it a
            # line of control characters is nothing, and every line passed on ends with a newline.
            line = _TERMINAL.sub("", raw.decode(errors="replace")).rstrip()
            if line:
                write_line(line)
                self._note(line.strip())
        stream.close()

    def _note(self, text: str) -> None:
        if text.startswith(ERROR_PREFIX):
            self.errors.append(_without_tail(text[len(ERROR_PREFIX) :]))
        if self.resource is None and any(marker in text for marker in RESOURCE_ERRORS):
            reason = text[len(ERROR_PREFIX) :] if text.startswith(ERROR_PREFIX) else _LOG_PREFIX.sub("", text)
            self.resource = _without_tail(reason.strip())[:MAX_CAUSE_CHARS]

    def wait(self, timeout: float = 10.0) -> None:
        """Until the process's stderr is closed and passed on (call after it exited)."""
        self._thread.join(timeout)

    def cause(self, returncode: int) -> str:
        if self.resource is not None:
            return self.resource
        if self.errors:
            return self.errors[-1][:MAX_CAUSE_CHARS]
        if returncode < 0:
            return f"killed by {signal.Signals(-returncode).name}"
        return f"exit {returncode}"


def _without_tail(text: str) -> str:
    for tail in _TAILS:
        if text.endswith(tail):
            return text[: -len(tail)]
    return text
