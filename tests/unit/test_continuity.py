"""stream/continuity.py: every input offset handled once and in order, or the worker stops."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from typing import Any

import pytest

from pipeline.stream import continuity
from pipeline.stream.continuity import Continuity

TP = namedtuple("TP", "topic partition")


class Died(Exception):
    pass


class FakeConsumer:
    def __init__(self, committed: dict[int, int | None]) -> None:
        self._committed_offset = {TP("calls", p): o for p, o in committed.items()}


def _run(
    offsets: list[int], committed: int | None, first_committed: dict[int, int | None], log_start: int = 0
) -> tuple[list[int], list[int], str]:
    """Feeds ``offsets`` of calls/0; returns the offsets handled, the broker lookups and why it died."""
    asked: list[int] = []

    def first(_topic: str, _partition: int, start: int, _timeout: float) -> int | None:
        asked.append(start)
        return first_committed.get(start)

    checker = Continuity(lambda: FakeConsumer({0: committed}), first, lambda _t, _p: log_start)
    handled: list[int] = []

    async def feed() -> str:
        for offset in offsets:
            try:
                if await checker.check("calls", 0, offset):
                    handled.append(offset)
            except Died as exc:
                return str(exc)
        return ""

    return handled, asked, asyncio.run(feed())


@pytest.fixture(autouse=True)
def _no_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    def die(reason: str, _exc: Any = None) -> None:
        raise Died(reason)

    monkeypatch.setattr(continuity, "die", die)


@pytest.mark.parametrize(
    ("offsets", "committed", "broker", "handled", "asked", "died"),
    [
        # In order from the committed offset: no broker lookup at all.
        ([5, 6, 7], 5, {}, [5, 6, 7], [], ""),
        # No commit yet: the first event is the log start, no broker fetch.
        ([0, 1, 2], None, {}, [0, 1, 2], [], ""),
        # Offsets 3-4 hold a transaction marker / aborted records: the broker confirms, handled.
        ([1, 2, 5, 6], 1, {3: 5}, [1, 2, 5, 6], [3], ""),
        # A record Faust never delivered (the chaos run): the worker stops before handling 2.
        ([0, 2, 3], None, {1: 1}, [0], [1], "offsets 1..1 never handled"),
        # The first event after an assignment lies past a committed record.
        ([9], 7, {7: 7}, [], [7], "offsets 7..8 never handled"),
        # A record delivered again within the assignment is skipped, not handled twice.
        ([3, 4, 3, 4, 5], 3, {}, [3, 4, 5], [], ""),
        # Below the committed offset: already committed, skipped.
        ([2, 3], 3, {}, [3], [], ""),
        # The broker does not answer: unknown is not good enough.
        ([4], 2, {}, [], [2], "could not be checked"),
    ],
)
def test_offsets_handled_once_in_order(
    offsets: list[int],
    committed: int | None,
    broker: dict[int, int | None],
    handled: list[int],
    asked: list[int],
    died: str,
) -> None:
    got_handled, got_asked, got_died = _run(offsets, committed, broker)
    assert (got_handled, got_asked) == (handled, asked)
    assert died in got_died and bool(died) == bool(got_died)


def test_without_a_commit_the_first_record_past_the_log_start_is_checked() -> None:
    # Log start 4; the first record delivered is 6: 4-5 hold a marker (fine) or records (stop).
    assert _run([6, 7], None, {4: 6}, log_start=4)[:2] == ([6, 7], [4])
    assert "offsets 4..5 never handled" in _run([6], None, {4: 4}, log_start=4)[2]


def test_a_rebalance_starts_again_from_the_committed_offset() -> None:
    checker = Continuity(lambda: FakeConsumer({0: 10}), lambda *_a: None, lambda _t, _p: 0)

    async def feed() -> list[bool]:
        out = [await checker.check("calls", 0, 10), await checker.check("calls", 0, 11)]
        checker.forget()  # the partition came back after a rebalance; Faust sought to 10 again
        out.append(await checker.check("calls", 0, 10))
        return out

    assert asyncio.run(feed()) == [True, True, True]
