"""Changelog recovery: it ends at the last committed changelog record, and is checked before any input.

Local table state (RocksDB) is a cache of the changelog topics; a worker that starts after an unclean
stop, or is assigned a partition, rebuilds it from them (read_committed) before it consumes input.
Faust decides that a partition is recovered by comparing the offset it received last with a
"highwater". Under ``exactly_once`` its highwater is the last stable offset minus one, which counts
the commit marker after the last record, so the last record never reaches it, and Faust ends such
partitions by a heuristic (``detect_aborted_tx``: after two empty waits on its changelog queue, any
partition whose consumer *position* passed the highwater is declared done). The position moves when
records are fetched, in the consumer's thread, not when they reach the queue in the event loop. On a
busy machine (load 4-8x the cores) fetched records routinely take over a second to cross, and the
heuristic declared partitions done with their records still on the way: the records arriving after
it were ignored as already seen. Worse, Faust keeps that verdict across a rebalance that leaves the
partition with the worker, so every later round in the process skipped the partition entirely: the
``alerted`` and ``balances`` changelogs were "applied to None" round after round, and the worker gave
up after 6 restarts (make chaos-busy, state loss plus resend). Six parts (each runs in an override of
Faust's ``Recovery``, ``Store`` or ``Consumer`` in stream/faust_seams.py, part 2 in faust_patches.py):

1. ``committed_highwaters``: each round's highwater is the offset of the last record of a committed
   transaction in each changelog partition (read from the partition's tail, read_committed, by
   ``committed_tails``; the log start minus one when there is none), so Faust's own "received up to
   the highwater" test ends recovery with the last committed record, never earlier. Local state past
   that record (writes no committed transaction made, e.g. state kept from another cluster) stops
   the process at once (``EXIT_RETRY``, no clean-shutdown marker: the next start rebuilds it).
2. ``_RecoveryPoll``: Faust's recovery module sees this instead of ``asyncio``; its wait on the
   changelog queue polls every 0.5 s but gives up (the "timeout" that runs the heuristic) only once
   the round has received everything up to the highwaters, or the service stops. A fetch that is slow
   to arrive is waited for; the heuristic never decides anything.
3. ``_LatchedEnd``: Faust clears its "recovery ended" signal at the top of every queue iteration. With
   the end at the last record (part 1) the signal is usually set by a record rather than by a timeout,
   and could be set and cleared again before the round started waiting for it: the worker then never
   resumed its input (why a highwater at the last record was once tried and reverted). The signal now
   stays set until the next round starts.
4. ``verify_completed``: before the worker resumes its input, every assigned changelog
   partition must have been applied exactly up to its last committed record (the store's persisted
   offset against the tails of part 1). Otherwise the process stops with ``EXIT_RETRY`` and without its
   clean-shutdown marker, so the next start rebuilds the state from the changelogs: a restart, never a
   lost call.
5. The same hook seeks the input partitions to their committed offsets before Faust resumes them, so
   Faust knows each committed offset before any input record reaches the agent. Faust resumes first
   and seeks after: on a busy machine records fetched in between reached the agent first, and the
   continuity check (stream/continuity.py), which starts from the committed offset Faust knows, took
   the log start instead and stopped the worker: "calls/2: offsets 0..9121 never handled", a restart
   without a fault on the first start of two worker processes.
   Every seek, and every time Faust lets the consumer's flow resume, also sends the input partitions
   the group never committed back to their log start (``seek_never_committed``, ``after_resume``).
   Faust's ``getmany`` drops the records its fetching thread returns while the consumer's flow is off
   (around every assignment) and relies on a seek to fetch them again; aiokafka seeks only partitions
   with a committed offset above 0, so on a partition without one they were never fetched again: its
   offset never committed and the run stalled until the watchdog (make chaos: a fresh cluster, and a
   ledger outage, which slows the one-process worker's loop, on a loaded machine). A record
   delivered twice this way is skipped the second time by the continuity check (step 3).
6. A batch of recovered records that cannot be written (a full disk) stops the process at once,
   naming the reason, instead of Faust's retrying it for ever with the reason in a warning.

Fault injection: ``recovery-short`` (the first recovery of the process loses the last record of every
batch it applies), ``recovery-write`` (every write of recovered state fails: a full disk) and, as on a
loaded machine, ``changelog-late`` (the first recovery's changelog records reach the queue 2 s after
they were fetched) and ``seek-late`` (every seek to the committed offsets waits 3 s first).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from pipeline.crashpoints import CRASH_AT, armed
from pipeline.errors import RetryableError
from pipeline.stream.guard import die

log = logging.getLogger(__name__)

TP = tuple[str, int]


def committed_tails(
    bootstrap: str, tps: Iterable[TP], timeout_seconds: float = 60.0
) -> dict[TP, tuple[int, int | None]]:
    """Per partition: its first offset and the offset of its last record that a committed transaction
    wrote (None when it has none). Reads only the tail: a window before the end that grows until it
    holds a committed record or reaches the start. An open transaction at the end (a worker that died
    mid-transaction) is waited out by the read_committed reader, as recovery itself would."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "callmeter-recovery-check",  # never joins nor commits: assign() only
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    deadline = time.monotonic() + timeout_seconds
    try:
        bounds = {}
        for topic, partition in tps:
            where = TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(where, timeout=10, cached=False)
            bounds[(topic, partition)] = (int(low), int(high))
        result: dict[TP, tuple[int, int | None]] = {tp: (low, None) for tp, (low, _high) in bounds.items()}
        pending = {tp: b for tp, b in bounds.items() if b[1] > b[0]}
        window = 64
        while pending:
            starts = {tp: max(low, high - window) for tp, (low, high) in pending.items()}
            last = _read_to_end(consumer, starts, deadline)
            for tp, start in starts.items():
                low = pending[tp][0]
                if last.get(tp) is not None or start == low:
                    result[tp] = (low, last.get(tp))
                    del pending[tp]
            window *= 16
        return result
    finally:
        consumer.close()


def _read_to_end(consumer: Consumer, starts: dict[TP, int], deadline: float) -> dict[TP, int]:
    consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in starts.items()])
    last: dict[TP, int] = {}
    at_end: set[TP] = set()
    while len(at_end) < len(starts):
        if time.monotonic() > deadline:
            missing = ", ".join(f"{t}/{p}" for t, p in sorted(set(starts) - at_end))
            text = f"could not read the end of changelog partitions {missing}"
            raise RetryableError(text)
        record = consumer.poll(0.5)
        if record is None:
            continue
        tp = (str(record.topic()), int(record.partition() or 0))
        err = record.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                at_end.add(tp)
                continue
            text = f"reading changelog {tp[0]}/{tp[1]}: {err}"
            raise RetryableError(text)
        last[tp] = max(last.get(tp, -1), int(record.offset() or 0))
    consumer.unassign()
    return last


async def _tails(bootstrap: str, tps: Iterable[Any]) -> dict[TP, tuple[int, int | None]]:
    keys = [(tp.topic, tp.partition) for tp in tps]
    return await asyncio.get_running_loop().run_in_executor(None, committed_tails, bootstrap, keys)


async def committed_highwaters(recovery: Any, tps: Any, destination: Any, title: str) -> None:
    """Part 1, for the active partitions (Faust's ``Recovery._build_highwaters``, overridden in
    stream/faust_seams.py; standby partitions, which this worker never has, keep Faust's)."""
    generation = recovery._generation_id
    try:
        tails = await _tails(recovery.app.bootstrap, sorted(tps))
    except Exception as exc:  # inside Faust's recovery task an exception would only stop recovery
        die(f"cannot read the ends of the changelogs: {type(exc).__name__}: {exc}", exc)
    ahead = []
    ends = {}
    for tp in tps:
        low, last = tails[(tp.topic, tp.partition)]
        ends[tp] = last if last is not None else low - 1
        applied = recovery.tp_to_table[tp].persisted_offset(tp)
        if applied is not None and applied > ends[tp]:
            ahead.append(f"{tp.topic}/{tp.partition} applied to {applied}, committed to {last}")
    if ahead:
        die(f"local state is past the committed changelog: {'; '.join(sorted(ahead)[:3])}")
    # Replaced in one step (no await in between): the queue task reads them after every record.
    destination.clear()
    destination.update(ends)
    recovery.callmeter_tails = (generation, tails)
    recovery.log.info(
        "Highwater for active changelog partitions:\n%s", recovery._highwater_logtable(ends, title=title)
    )


POLL_SECONDS = 0.5
_NO_TAILS: dict[TP, tuple[int, int | None]] = {}


class _RecoveryPoll:
    """Part 2. Only ``wait_for`` differs from ``asyncio``; Faust calls it on its changelog queue only."""

    recovery: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def wait_for(self, aw: Any, timeout: float | None = None) -> Any:
        task = asyncio.ensure_future(aw)
        try:
            while True:
                done, _pending = await asyncio.wait({task}, timeout=POLL_SECONDS)
                if done:
                    return task.result()
                recovery = self.recovery
                if recovery is not None and (
                    recovery.should_stop or (recovery.in_recovery and _received_all(recovery))
                ):
                    raise TimeoutError  # Faust then ends the round (or stops): nothing is left to receive
        finally:
            # No await since the check above: a record the queue hands over now stays in the queue.
            if not task.done():
                task.cancel()


# Faust's recovery module sees this as its ``asyncio`` (stream/faust_patches.py: there is no seam).
poll = _RecoveryPoll()


def _received_all(recovery: Any) -> bool:
    """Every active changelog partition received up to its highwater (an unknown offset has not)."""
    offsets = recovery.active_offsets
    return all(
        offsets.get(tp) is not None and offsets[tp] >= highwater
        for tp, highwater in recovery.active_highwaters.items()
    )


class _LatchedEnd(asyncio.Event):
    """Part 3: ``clear`` (Faust's, once per queue iteration) does nothing; ``reset`` starts a round."""

    def clear(self) -> None:
        return

    def reset(self) -> None:
        super().clear()


def latched_end(recovery: Any) -> asyncio.Event:
    """Part 3: Faust's ``Recovery.signal_recovery_end``, a ``_LatchedEnd``."""
    if recovery._signal_recovery_end is None:
        recovery._signal_recovery_end = _LatchedEnd()
    event: asyncio.Event = recovery._signal_recovery_end
    return event


def round_started(recovery: Any) -> None:
    """A round starts (Faust calls ``_set_recovery_started`` again just before fetching): the end of
    the last one is past, and part 2's poll watches this recovery."""
    poll.recovery = recovery
    end = latched_end(recovery)
    if isinstance(end, _LatchedEnd):
        end.reset()


async def verify_completed(recovery: Any, generation_id: int) -> None:
    """Parts 4 and 5, before Faust's ``Recovery.on_recovery_completed`` resumes the input."""
    global _skip_last_records, _delay_changelogs
    app = recovery.app
    if app.consumer_generation_id == generation_id and recovery.active_tps:
        tps = sorted(recovery.active_tps)
        generation, tails = getattr(recovery, "callmeter_tails", (None, _NO_TAILS))
        if generation != generation_id or any((tp.topic, tp.partition) not in tails for tp in tps):
            try:
                tails = await _tails(app.bootstrap, tps)
            except Exception as exc:  # inside Faust's recovery task an exception would only stop recovery
                die(f"cannot check changelog recovery: {type(exc).__name__}: {exc}", exc)
        wrong = []
        for tp in tps:
            applied = recovery.tp_to_table[tp].persisted_offset(tp)
            last = tails[(tp.topic, tp.partition)][1]
            if applied != last:
                wrong.append(f"{tp.topic}/{tp.partition} applied to {applied}, committed to {last}")
        if wrong:
            die(f"changelog recovery incomplete: {'; '.join(wrong[:3])}")
        # Part 5. Faust resumes the input partitions and only then seeks them to their committed
        # offsets: records fetched in between reached the agent before Faust knew the committed
        # offset, and the continuity check took the log start for it (a restart without a fault).
        await recovery._wait(app.consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
    _skip_last_records = _delay_changelogs = False


# Fault injection (crash point ``recovery-short``): the first recovery of the process loses the last
# record of every batch it applies, as when Faust skipped records it had fetched. (``recovery-write``:
# every write of recovered state fails, as on a full disk.)
_skip_last_records = bool(CRASH_AT) and armed("recovery-short")
_failing_writes = CRASH_AT.startswith("recovery-write")


def apply_or_die(store: Any, batch: Any, apply: Callable[[Any], None]) -> None:
    """Part 6, around Faust's ``Store.apply_changelog_batch`` (``apply``): a batch of recovered records
    that cannot be written stops the process with the reason. Faust only logged it ("Error in recovery
    ...") and tried again every half second, for ever: a full disk held the worker in recovery, with
    the cause in a warning, until the stall watchdog."""
    if _skip_last_records:
        events = list(batch)
        last = {event.message.tp: i for i, event in enumerate(events)}
        batch = [event for i, event in enumerate(events) if i != last[event.message.tp]]
    try:
        if _failing_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store.path))
        apply(batch)
    except Exception as exc:  # inside Faust's recovery task an exception is only logged
        die(f"cannot write recovered table state: {type(exc).__name__}: {exc}", exc)


# Fault injection (crash point ``changelog-late``): until the first recovery of the process completes,
# a fetched batch holding changelog records reaches the queue 2 s after the consumer fetched it.
# (``seek-late``: every seek of the input partitions to their committed offsets waits 3 s first, as on
# a loaded machine, while the fetcher goes on: stream/faust_seams.py.)
LATE_SECONDS = 2.0
_delay_changelogs = bool(CRASH_AT) and armed("changelog-late")


async def changelogs_late(messages: AsyncIterator[tuple[Any, Any]]) -> AsyncIterator[tuple[Any, Any]]:
    """``changelog-late`` around Faust's ``Consumer.getmany``."""
    late = _delay_changelogs
    async for tp, message in messages:
        if late and tp.topic.endswith("-changelog"):
            late = False
            await asyncio.sleep(LATE_SECONDS)
        yield tp, message


def never_committed(assigned: Iterable[Any], committed: Mapping[Any, int | None], internal: str) -> list[Any]:
    """Input partitions (not Faust's own topics, which start with ``internal``) without a committed
    offset: Faust keeps none for them, or 0, which aiokafka does not seek to either."""
    return sorted(
        (tp for tp in assigned if not tp.topic.startswith(internal) and not committed.get(tp)),
        key=lambda tp: (tp.topic, tp.partition),
    )


async def seek_never_committed(consumer: Any) -> None:
    """Part 5, after each seek to the committed offsets: partitions never committed go to their log
    start (what ``auto_offset_reset = earliest`` means), through Faust's ``seek_wait``, which seeks in
    the consumer's own thread and resets how far Faust has read them. (Faust's plain ``seek`` calls
    aiokafka from the event loop's thread; with the fetcher running that raced its
    ``fetched_records``: a KeyError that crashed a worker in make chaos.)"""
    tps = never_committed(consumer.assignment(), consumer._committed_offset, f"{consumer.app.conf.id}-")
    if tps:
        await consumer.seek_wait(dict(await consumer.earliest_offsets(*tps)))


_resume_seeks: set[asyncio.Task[None]] = set()


def after_resume(consumer: Any) -> None:
    """Part 5 once the consumer's flow resumes: ``seek_never_committed`` as a task (kept referenced
    until done). A failure is logged, not fatal: the stall watchdog still stands behind it, and a
    broker that is away at that moment must not cost a restart."""
    task = asyncio.ensure_future(_seek_or_log(consumer))
    _resume_seeks.add(task)
    task.add_done_callback(_resume_seeks.discard)


async def _seek_or_log(consumer: Any) -> None:
    if consumer.app.should_stop:
        return
    try:
        await seek_never_committed(consumer)
    except Exception as exc:  # best effort, see after_resume
        log.warning("cannot seek never-committed input partitions: %s: %s", type(exc).__name__, exc)
