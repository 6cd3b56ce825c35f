"""Crash points for the fault-injection tests (``make chaos``): ``CALLMETER_CRASH_AT=step:n[:mode]``.

When the named step of a commit protocol is reached for the n-th time in this process, ``raise``
throws inside it (an agent exception), ``kill`` sends SIGKILL to the process (a power cut) and ``hang``
stops there for an hour (a worker alive but stuck: heartbeats go on, nothing commits; in the stream
agent it awaits, so the worker still answers /metrics, in the sink it blocks the sink's thread). Unset,
callers skip the call behind a module constant, so the hot path pays one truthiness test.

Steps: ``consumer-skip`` (the n-th fetched ``calls`` record never reaches the agent, see
pipeline/stream/continuity.py), ``worker-4-state-written`` (dedupe key and balance written, output not
yet sent), ``worker-5-output-sent`` (output sent, event not yet acknowledged), ``after-event``
(whole event done, before its offset is committed), ``worker-6-committed`` (a transaction just
committed), ``sink-3-inserted`` (ledger rows inserted, offsets not committed).

``recovery-short`` is a fault of another kind (mode ``short``, see ``armed``): the first changelog
recovery of the process loses the last record of every batch it applies to the tables, as when Faust
ended a partition's recovery before the records it had fetched reached the table
(pipeline/stream/recovery.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

from pipeline.errors import PipelineError

CRASH_AT = os.environ.get("CALLMETER_CRASH_AT", "")
_reached: Counter[str] = Counter()


class InjectedCrash(PipelineError):
    """Thrown by a ``raise`` crash point."""


def armed(step: str) -> bool:
    """For faults that are not a crash: True when ``step`` is reached for the n-th time in this process
    and CALLMETER_CRASH_AT names it; the caller injects the fault itself."""
    parts = CRASH_AT.split(":")
    if parts[0] != step:
        return False
    _reached[step] += 1
    return _reached[step] == int(parts[1] if len(parts) > 1 else 1)


async def acrash_point(step: str) -> None:
    """``crash_point`` for the stream agent: ``hang`` awaits instead of blocking the thread, so the
    worker is stuck exactly like an agent awaiting something that never comes — its event loop still
    answers /metrics and /status, while nothing is processed or committed."""
    parts = CRASH_AT.split(":")
    if len(parts) > 2 and parts[0] == step and parts[2] == "hang":
        _reached[step] += 1
        if _reached[step] == int(parts[1]):
            await asyncio.sleep(3600)
        return
    crash_point(step)


def crash_point(step: str, _hint: int = 0) -> None:
    parts = CRASH_AT.split(":")
    if not parts or parts[0] != step:
        return
    _reached[step] += 1
    if _reached[step] != int(parts[1] if len(parts) > 1 else 1):
        return
    if len(parts) > 2 and parts[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if len(parts) > 2 and parts[2] == "hang":
        time.sleep(3600)
    msg = f"injected crash at {step} (#{_reached[step]})"
    raise InjectedCrash(msg)
