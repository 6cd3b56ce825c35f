"""`callmeter worker` runs the stream worker in a child process and restarts it after a recoverable fault.

The worker process leaves with ``EXIT_RETRY`` when continuing in-process would be unsafe: an exception
inside an event (its partition's transaction must abort, pipeline/stream/guard.py), a stall, a lost broker,
a ledger that refused a batch. A fresh process is the one recovery Faust does right: its producers
fence the open transactions, local state is rebuilt from the changelogs, and consumption resumes from
the last committed offsets. Up to ``worker_restarts`` restarts in a row, with growing pauses; after that
(or on any other non-zero exit) the command fails with the child's reason already on stderr.

With ``worker_ledger_sink`` false, only stream worker processes run: the ledger is written by a
`callmeter sink` service (supervised the same way), so N worker services and one sink service can run
on different hosts.

With ``worker_processes`` = N > 1 it runs N stream worker processes (one Faust consumer group; Kafka
spreads the input partitions over them, and a process that dies is replaced while the others take its
partitions meanwhile) and one ledger sink process (pipeline/ledger/sink_runner.py), each restarted on its
own. Every process prints one JSON line of counters when it ends; the command prints their sum.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pipeline.errors import PipelineError
from pipeline.identity import ROLE_ENV, process_role
from pipeline.settings import Settings
from pipeline.stream.guard import EXIT_RETRY

CHILD_ENV = "CALLMETER_WORKER_CHILD"
# Set on a process started again after a fault: it waits out an unreachable broker (see restarted()).
RESTARTED_ENV = "CALLMETER_WORKER_RESTARTED"
# A child that ran this long before failing counts as healthy: the restart budget starts again.
_HEALTHY_SECONDS = 120.0


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def restarted() -> bool:
    """A restart after a fault: the broker may be what failed (killed, restarting), so a broker that
    cannot be reached yet is one more recoverable fault, within ``worker_restarts``, not a bad setting.
    On a first start it is reported and the command fails (it usually is a bad address)."""
    return os.environ.get(RESTARTED_ENV) == "1"


def child_role() -> str:
    """``worker`` (stream worker with the ledger sink inside), ``stream`` (without) or ``sink``."""
    return process_role()


@dataclass
class _Child:
    role: str
    index: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    result: dict[str, Any] | None = None
    done: bool = False


def process_roles(settings: Settings) -> list[tuple[str, int]]:
    """The processes `callmeter worker` runs, as (role, index): process i serves its web API on
    ``worker_web_port`` + i (`callmeter status` reads them there)."""
    # More processes than input partitions would sit idle in the group.
    n = max(1, min(settings.worker_processes, settings.partitions))
    if not settings.worker_ledger_sink:
        # A `callmeter sink` service elsewhere writes the ledger.
        return [("stream", i) for i in range(n)]
    if n == 1:
        return [("worker", 0)]
    return [("stream", i) for i in range(n)] + [("sink", n)]


SINK_ONLY = [("sink", 0)]


def supervise(settings: Settings, argv: Sequence[str], roles: list[tuple[str, int]] | None = None) -> int:
    """Run ``callmeter <argv>`` as the worker process(es) until they exit for good; print their merged
    result line and return 0, or return the exit code of the first that failed for good. ``roles``:
    the processes to run, by default those ``worker_processes`` and ``worker_ledger_sink`` ask for
    (``callmeter sink`` asks for ``SINK_ONLY``)."""
    base = dict(os.environ)
    base[CHILD_ENV] = "1"
    crash_at = base.pop("CALLMETER_CRASH_AT", None)
    children = [
        _Child(
            role,
            index,
            {
                **base,
                ROLE_ENV: role,
                "CALLMETER_WORKER_INDEX": str(index),
                "CALLMETER_WORKER_WEB_PORT": str(settings.worker_web_port + index),
            },
        )
        for role, index in (roles or process_roles(settings))
    ]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            # A crash point (pipeline/crashpoints.py) fires in each child's first process only.
            _start(child, argv, {"CALLMETER_CRASH_AT": crash_at} if crash_at else {})
        while not all(child.done for child in children):
            time.sleep(0.1)
            for child in children:
                try:
                    failed = _tend(child, argv, settings, stopping)
                except PipelineError:
                    _stop_all(children)
                    raise
                if failed is not None:
                    _stop_all(children)
                    return failed
        _print_result(children)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(child: _Child, argv: Sequence[str], extra: dict[str, str] | None = None) -> None:
    child.started = time.monotonic()
    child.restart_at = None
    child.proc = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "pipeline", *argv],
        env={**child.env, **(extra or {})},
        stdout=subprocess.PIPE,
    )


def _tend(child: _Child, argv: Sequence[str], settings: Settings, stopping: bool) -> int | None:
    """Look after one child; return an exit code when the whole command must fail with it."""
    if child.done:
        return None
    if child.proc is None:
        if child.restart_at is not None and time.monotonic() >= child.restart_at and not stopping:
            _start(child, argv, {RESTARTED_ENV: "1"})
        elif stopping:
            child.done = True
        return None
    code = child.proc.poll()
    if code is None:
        return None
    out = child.proc.stdout.read().decode() if child.proc.stdout else ""
    child.proc = None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    # Killed by a signal nobody here sent (the OOM killer, kill -9): as recoverable as a fault.
    killed = code < 0 and -code not in (signal.SIGTERM, signal.SIGINT)
    if code == 0 or (stopping and (code == EXIT_RETRY or killed)):
        # Stopped mid-event on request: nothing was committed past the last whole event, and the next
        # start rebuilds local state. Not a failure of the run the operator asked to end.
        child.result = json.loads(lines[-1]) if lines else {}
        child.done = True
        return None
    if code != EXIT_RETRY and not killed:
        return code
    child.restarts = 0 if time.monotonic() - child.started > _HEALTHY_SECONDS else child.restarts + 1
    if child.restarts > settings.worker_restarts:
        msg = (
            f"{child.role} process failed {child.restarts} times in a row; giving up (see the reasons above)"
        )
        raise PipelineError(msg)
    pause = min(2.0 ** (child.restarts - 1), 30.0)
    sys.stderr.write(
        f"callmeter: {child.role} process {child.index} restarting in {pause:.0f} s "
        f"({child.restarts} of {settings.worker_restarts})\n"
    )
    sys.stderr.flush()
    child.restart_at = time.monotonic() + pause
    return None


def _stop_all(children: list[_Child]) -> None:
    for child in children:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in children:
        if child.proc is not None:
            try:
                child.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.proc.kill()


def _print_result(children: list[_Child]) -> None:
    """One JSON line, as one worker process prints it: counters summed over the processes."""
    merged: dict[str, Any] = {}
    for child in children:
        for key, value in (child.result or {}).items():
            if isinstance(value, dict):
                bucket = merged.setdefault(key, {})
                for name, n in value.items():
                    bucket[name] = bucket.get(name, 0) + n
            elif isinstance(value, int | float):
                merged[key] = merged.get(key, 0) + value
            else:
                merged[key] = value
    if merged or any(child.result is not None for child in children):
        print(json.dumps(merged, sort_keys=True), flush=True)
