"""`callmeter worker` runs the stream worker in a child process and restarts it after a recoverable fault.

The worker process leaves with ``EXIT_RETRY`` when continuing in-process would be unsafe: an exception
inside an event (its partition's transaction must abort, pipeline/guard.py), a stall, a lost broker,
a ledger that refused a batch. A fresh process is the one recovery Faust does right: its producers
fence the open transactions, local state is rebuilt from the changelogs, and consumption resumes from
the last committed offsets. Up to ``worker_restarts`` restarts in a row, with growing pauses; after that
(or on any other non-zero exit) the command fails with the child's reason already on stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from pipeline.errors import PipelineError
from pipeline.guard import EXIT_RETRY
from pipeline.settings import Settings

CHILD_ENV = "CALLMETER_WORKER_CHILD"
# A child that ran this long before failing counts as healthy: the restart budget starts again.
_HEALTHY_SECONDS = 120.0


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``callmeter <argv>`` as the worker child until it exits for good; return its exit code."""
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    crash_at = env.pop("CALLMETER_CRASH_AT", None)
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    restarts = 0
    first = True
    try:
        while True:
            started = time.monotonic()
            # A crash point (pipeline/crashpoints.py) fires in the first process only, not in restarts.
            child_env = (
                {**env, "CALLMETER_CRASH_AT": crash_at} if crash_at and restarts == 0 and first else env
            )
            first = False
            child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], env=child_env)  # noqa: S603 - our own CLI
            code = _wait(child)
            # Killed by a signal nobody here sent (the OOM killer, kill -9): as recoverable as a fault.
            killed = code < 0 and -code not in (signal.SIGTERM, signal.SIGINT)
            if code != EXIT_RETRY and not killed:
                return code
            if stopping:
                # Stopped mid-event on request: nothing was committed past the last whole event, and the
                # next start rebuilds local state. Not a failure of the run the operator asked to end.
                return 0
            restarts = 0 if time.monotonic() - started > _HEALTHY_SECONDS else restarts + 1
            if restarts > settings.worker_restarts:
                msg = f"worker failed {restarts} times in a row; giving up (see the reasons above)"
                raise PipelineError(msg)
            pause = min(2.0 ** (restarts - 1), 30.0)
            sys.stderr.write(
                f"callmeter: worker restarting in {pause:.0f} s ({restarts} of {settings.worker_restarts})\n"
            )
            sys.stderr.flush()
            time.sleep(pause)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(child: subprocess.Popen[bytes]) -> int:
    while True:
        try:
            return child.wait()
        except InterruptedError:  # a forwarded signal interrupted the wait
            continue
