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
partitions meanwhile) and one ledger sink process (sinks/process.py), each restarted on its
own. Every process prints one JSON line of counters when it ends; the command prints their sum,
adding for each process that stopped on a fault the counters of its last commit (pipeline/runcounts.py).

The last line of a failed run names its cause (pipeline/commands/childlog.py). With ``--until-idle`` a
run stopped by SIGTERM or SIGINT before its input was done exits 1 and says what is left: it did not
finish, whatever its processes printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.commands.childlog import ERROR_PREFIX, ChildLog, write_line
from pipeline.errors import PipelineError
from pipeline.identity import ROLE_ENV, process_role
from pipeline.runcounts import STATS_FILE_ENV, add_counters, read_committed
from pipeline.settings import Settings
from pipeline.stream.guard import EXIT_RETRY

CHILD_ENV = "CALLMETER_WORKER_CHILD"
# Set on a process started again after a fault: it waits out an unreachable broker (see restarted()).
RESTARTED_ENV = "CALLMETER_WORKER_RESTARTED"
# A child that ran this long before failing counts as healthy: the restart budget starts again.
_HEALTHY_SECONDS = 120.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
    stats_file: Path
    proc: subprocess.Popen[bytes] | None = None
    log: ChildLog | None = None
    started: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    result: dict[str, Any] | None = None
    # Counters of this slot's earlier processes that stopped on a fault, as of their last commit.
    carried: dict[str, Any] = field(default_factory=dict)
    failure: str = ""
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
    counts_dir = settings.data_dir / "run"
    children = [
        _Child(
            role,
            index,
            {
                **base,
                ROLE_ENV: role,
                "CALLMETER_WORKER_INDEX": str(index),
                "CALLMETER_WORKER_WEB_PORT": str(settings.worker_web_port + index),
                STATS_FILE_ENV: str(counts_dir / f"{role}-{index}.json"),
            },
            counts_dir / f"{role}-{index}.json",
        )
        for role, index in (roles or process_roles(settings))
    ]
    stopped_by: int | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopped_by
        stopped_by = signum
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _STOP_SIGNALS}
    try:
        for child in children:
            # A crash point (pipeline/crashpoints.py) fires in each child's first process only.
            _start(child, argv, {"CALLMETER_CRASH_AT": crash_at} if crash_at else {})
        while not all(child.done for child in children):
            time.sleep(0.1)
            for child in children:
                try:
                    failed = _tend(child, argv, settings, stopped_by is not None)
                except PipelineError:
                    _stop_all(children)
                    raise
                if failed is not None:
                    _stop_all(children)
                    write_line(child.failure)  # last: the others' lines while they stopped came first
                    return failed
        _print_result(children)
        if stopped_by is not None and "--until-idle" in argv:
            return _unfinished(settings, children, signal.Signals(stopped_by).name)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(child: _Child, argv: Sequence[str], extra: dict[str, str] | None = None) -> None:
    child.started = time.monotonic()
    child.restart_at = None
    child.stats_file.unlink(missing_ok=True)
    child.proc = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "pipeline", *argv],
        env={**child.env, **(extra or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.proc.stderr is not None
    child.log = ChildLog(child.proc.stderr)


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
    log = child.log
    assert log is not None
    log.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    # Killed by a signal nobody here sent (the OOM killer, kill -9): as recoverable as a fault.
    killed = code < 0 and -code not in _STOP_SIGNALS
    if code == 0 or (stopping and (code == EXIT_RETRY or code < 0)):
        # Stopped mid-event on request: nothing was committed past the last whole event, and the next
        # start rebuilds local state. Not a failure of the run the operator asked to end.
        child.result = json.loads(lines[-1]) if lines else read_committed(child.stats_file)
        child.done = True
        return None
    what = f"{child.role} process {child.index}"
    if code != EXIT_RETRY and not killed:
        child.failure = f"{ERROR_PREFIX}{log.cause(code)} ({what} exited {code})"
        return code
    child.carried = add_counters(child.carried, read_committed(child.stats_file))
    child.restarts = 0 if time.monotonic() - child.started > _HEALTHY_SECONDS else child.restarts + 1
    if child.restarts > settings.worker_restarts:
        msg = f"{log.cause(code)} ({what} failed {child.restarts} times in a row; giving up)"
        raise PipelineError(msg)
    pause = min(2.0 ** (child.restarts - 1), 30.0)
    budget = f"{child.restarts} of {settings.worker_restarts}"
    write_line(f"callmeter: {what} restarting in {pause:.0f} s ({budget})")
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
            if child.log is not None:
                child.log.wait()


def _print_result(children: list[_Child]) -> None:
    """One JSON line, as one worker process prints it: counters summed over the processes, those of
    processes that stopped on a fault included up to their last commit."""
    merged: dict[str, Any] = {}
    for child in children:
        add_counters(merged, child.carried)
        add_counters(merged, child.result or {})
    if merged or any(child.result is not None for child in children):
        print(json.dumps(merged, sort_keys=True), flush=True)


def _unfinished(settings: Settings, children: list[_Child], signame: str) -> int:
    """A run stopped by a signal: 0 only when everything was committed and written anyway."""
    from pipeline.commands.worklist import work_left

    roles = {child.role for child in children}
    try:
        left = work_left(settings, inputs=bool(roles - {"sink"}), outputs=bool(roles & {"worker", "sink"}))
    except Exception as exc:  # the broker may be what the operator is stopping everything for
        write_line(f"{ERROR_PREFIX}stopped by {signame}; what is left could not be checked: {exc}")
        return 1
    if not left:
        return 0
    write_line(f"{ERROR_PREFIX}stopped by {signame} before the run was done: {'; '.join(left)}")
    return 1
