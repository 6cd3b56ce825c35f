"""Every input record is handled once and in order, or the worker stops (make chaos, broker loss).

Seen in ``make chaos`` (broker killed -9 and back 15 s later): after the rebalance that followed, Faust
handed the agent offsets 0, 2, 3, ... of a ``calls`` partition and never offset 1, then committed past it
(``Consumer._new_offset`` accepts one missing offset right after the last commit, and any offset its
fetcher recorded as a gap). The call was neither rated nor dead-lettered, and nothing said so.

A read_committed consumer legitimately jumps over offsets (transaction markers, aborted records), so a
hole alone proves nothing; the broker decides. Per input partition, within one assignment:

0. An event the agent took before a rebalance began, and that waited for the commit guard while the
   rebalance committed, is not handled (nor acked): the guard says so (stream/guard.py, step 3). Its
   partition's next owner, this worker or another, gets it again from the committed offset.
1. First event after an assignment: the expected offset is the committed one Faust sought to; when
   Faust knows none (no commit yet, or 0), the partition's log start.
2. ``offset == expected``: in order.
3. ``offset < expected``: a record already handled in this assignment (or committed) was delivered
   again. It is skipped: handling it again would count a second duplicate or rate it twice.
4. ``offset > expected`` (or expected unknown): every offset in between must hold no committed record:
   a read_committed fetch from ``expected`` (from the log start when unknown) must return this record
   first. Otherwise the process stops at once (``die``): this event's transaction is never committed,
   and the restarted worker resumes from the last commit, which lies before the hole. The fetch (about
   10 ms, on a consumer kept for it) happens only at a hole: after each transaction marker when
   a gateway produces transactionally, or a partition whose first records were aborted.
5. The expected offset becomes ``offset + 1``.

Every rebalance forgets the expected offsets (step 1 again).

Fault injection (crash point ``consumer-skip:n``): the n-th ``calls`` record Faust fetches is dropped
before it reaches the agent, as in the chaos run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipeline import metrics
from pipeline.crashpoints import CRASH_AT, armed
from pipeline.stream.guard import die

log = logging.getLogger(__name__)

TP = tuple[str, int]
VERIFY_TIMEOUT_SECONDS = 30.0


class CommittedReader:
    """Answers "the first record a read_committed reader sees at or after an offset" (step 4) and a
    partition's log start (step 1), through one consumer kept for the process."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumer: Consumer | None = None

    def log_start(self, topic: str, partition: int) -> int:
        """The partition's first offset (ListOffsets)."""
        low, _high = self._client().get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        return int(low)

    def first_committed_offset(self, topic: str, partition: int, start: int, timeout: float) -> int | None:
        """None when no record arrived within ``timeout`` seconds (the answer is unknown)."""
        consumer = self._client()
        consumer.assign([TopicPartition(topic, partition, max(start, 0))])
        try:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                msg = consumer.poll(min(1.0, left))
                found = msg.offset() if msg is not None and not msg.error() else None
                if found is not None:
                    return found
            return None
        finally:
            consumer.unassign()

    def _client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": "callmeter-continuity",
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    # A re-assigned partition's first fetch otherwise waits out the broker's default
                    # 500 ms fetch wait: measured 0.5 s per check, 10 ms with this.
                    "fetch.wait.max.ms": 10,
                }
            )
        return self._consumer


FirstCommitted = Callable[[str, int, int, float], "int | None"]
LogStart = Callable[[str, int], int]


class Continuity:
    """Steps 1-5 for the agent: ``check`` before an event is handled, ``forget`` at every rebalance.
    ``first_committed`` and ``log_start`` are ``CommittedReader``'s (stand-ins in unit tests)."""

    def __init__(
        self, consumer: Callable[[], Any], first_committed: FirstCommitted, log_start: LogStart
    ) -> None:
        self._faust_consumer = consumer
        self._first_committed = first_committed
        self._log_start = log_start
        self._expected: dict[TP, int | None] = {}
        self.redelivered = 0
        self.stale = 0

    def forget(self) -> None:
        self._expected.clear()

    async def check(self, topic: str, partition: int, offset: int) -> bool:
        """True when the event is to be handled; False for a redelivered one (step 3) or one taken
        before a rebalance began (step 0). Stops the process on a hole that holds committed records
        (step 4)."""
        guard = getattr(getattr(self._faust_consumer(), "app", None), "guard", None)
        if guard is not None and not guard.current:  # step 0
            self.stale += 1
            log.info("%s/%d@%d taken before a rebalance: left to its next owner", topic, partition, offset)
            return False
        tp = (topic, partition)
        expected = self._expected.get(tp, -1)
        if expected == -1:  # step 1
            expected = self._committed(topic, partition)
            if expected is None:
                # No commit Faust knows of: in order when this is the partition's first record (one
                # ListOffsets; asked of Faust's consumer it waited ~1.5 s behind its fetch loop).
                with contextlib.suppress(Exception):
                    expected = await asyncio.to_thread(self._log_start, topic, partition)
        if expected is not None and offset == expected:  # step 2, the hot path
            self._expected[tp] = offset + 1
            return True
        if expected is not None and offset < expected:  # step 3
            self.redelivered += 1
            metrics.REDELIVERED_EVENTS.labels(topic=topic).inc()
            log.warning(
                "%s/%d offset %d delivered again (next expected %d): skipped, it was handled already",
                topic, partition, offset, expected,
            )  # fmt: skip
            return False
        # Step 4. Faust's own record of gaps is no proof: it notes whatever its fetch loop did not
        # deliver, the lost record included.
        start = expected if expected is not None else 0
        wait = VERIFY_TIMEOUT_SECONDS
        first = await asyncio.to_thread(self._first_committed, topic, partition, start, wait)
        if first is None or first < offset:
            what = "could not be checked" if first is None else f"holds a committed record at {first}"
            die(f"{topic}/{partition}: offsets {start}..{offset - 1} never handled; the range {what}")
        self._expected[tp] = offset + 1  # step 5
        return True

    def _committed(self, topic: str, partition: int) -> int | None:
        """The offset Faust sought to at the assignment; None when it knows none (no commit, or 0)."""
        for tp, value in getattr(self._faust_consumer(), "_committed_offset", {}).items():
            if tp.topic == topic and tp.partition == partition:
                return value if isinstance(value, int) and value > 0 else None
        return None


# -- fault injection: ``consumer-skip:n`` ----------------------------------------------------------------
_skips_calls = CRASH_AT.startswith("consumer-skip")


async def skipping_calls(messages: AsyncIterator[tuple[Any, Any]]) -> AsyncIterator[tuple[Any, Any]]:
    """``consumer-skip:n`` around Faust's ``Consumer.getmany`` (stream/faust_seams.py): the n-th fetched
    ``calls`` record never reaches the agent."""
    async for tp, message in messages:
        if _skips_calls and tp.topic.endswith("calls") and armed("consumer-skip"):
            log.warning(
                "fault injected: %s/%d offset %d dropped before the agent",
                tp.topic,
                tp.partition,
                message.offset,
            )
            continue
        yield tp, message
