"""`make chaos-busy`: the chaos scenarios on a busy machine (CALLMETER_CHAOS_BUSY=1).

CPU hogs run beside each scenario, keeping the load average near four times the cores, as on a
loaded production host or CI box: rebalances, recoveries and timeouts stretch there. Each hog dies
with the test process (PR_SET_PDEATHSIG) and after an hour at the latest, so none outlives a run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

BUSY_ENV = "CALLMETER_CHAOS_BUSY"
HOGS_ENV = "CALLMETER_CHAOS_BUSY_HOGS"
_HOG = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end:\n    pass\n"
_PR_SET_PDEATHSIG = 1


def busy_mode() -> bool:
    return os.environ.get(BUSY_ENV, "") not in ("", "0")


def hog_count() -> int:
    return int(os.environ.get(HOGS_ENV) or 4 * (os.cpu_count() or 2))


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_hogs(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", _HOG], preexec_fn=_die_with_parent) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        hog.kill()
    for hog in hogs:
        hog.wait()


def restarts(stderr: str) -> int:
    """Worker processes the supervisor restarted during a run (its "restarting in" lines)."""
    return sum(" restarting in " in line for line in stderr.splitlines() if line.startswith("callmeter: "))
