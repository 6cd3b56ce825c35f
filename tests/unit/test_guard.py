"""stream/guard.py step 3 with stream/continuity.py step 0: an event the agent took before a rebalance
began, and that waited for the guard while the rebalance committed, is neither handled nor acked."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.stream.continuity import Continuity
from pipeline.stream.guard import CommitGuard

TP = namedtuple("TP", "topic partition")


class Event:
    def __init__(self, offset: int) -> None:
        self.message = SimpleNamespace(topic="calls", partition=0, offset=offset)
        self.acked = False

    def ack(self) -> None:
        self.acked = True


def _agent(flow: list[bool]) -> tuple[list[int], list[Event]]:
    """The stream agent's loop (stream/worker.py ``_agent``) over offsets 5, 6, 7 of calls/0, with
    Faust's flow control as ``flow`` says at the moment each event gets the guard."""
    guard = CommitGuard()
    states = iter(flow)
    guard.flowing = lambda: next(states)
    consumer = SimpleNamespace(_committed_offset={TP("calls", 0): 5}, app=SimpleNamespace(guard=guard))
    checker = Continuity(lambda: consumer, lambda *_a: None, lambda _t, _p: 0)
    events = [Event(offset) for offset in (5, 6, 7)]
    handled: list[int] = []

    async def run() -> None:
        for event in events:
            async with guard.batch([event]):
                msg = event.message
                if not await checker.check(msg.topic, msg.partition, msg.offset):
                    continue
                handled.append(msg.offset)

    asyncio.run(run())
    return handled, events


@pytest.mark.parametrize(
    ("flow", "handled", "acked"),
    [
        ([True, True, True], [5, 6, 7], [True, True, True]),
        # A rebalance began (flow suspended) while 6 waited for the guard: 6 and 7 are left to the
        # partitions' next owner, which gets them from the committed offset.
        ([True, False, False], [5], [True, False, False]),
    ],
)
def test_an_event_taken_before_a_rebalance_is_left_alone(
    flow: list[bool], handled: list[int], acked: list[bool]
) -> None:
    got, events = _agent(flow)
    assert got == handled
    assert [event.acked for event in events] == acked


def test_a_stale_event_costs_no_broker_lookup() -> None:
    asked: list[Any] = []
    guard = CommitGuard()
    guard.current = False
    consumer = SimpleNamespace(_committed_offset={}, app=SimpleNamespace(guard=guard))
    checker = Continuity(lambda: consumer, lambda *a: asked.append(a), lambda *a: asked.append(a) or 0)
    assert asyncio.run(checker.check("calls", 0, 9)) is False
    assert (asked, checker.stale) == ([], 1)
