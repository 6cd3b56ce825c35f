"""Changelog recovery, checked before the worker consumes any input (issue 9).

Local table state (RocksDB) is a cache of the changelog topics; a worker that starts after an unclean
stop, or is assigned a partition, rebuilds it from them (read_committed) before it consumes input.
Faust decides that a partition is recovered by comparing what it applied with a "highwater". Under
``exactly_once`` it took that from the consumer's last stable offset, which counts the commit marker
after the last record, so the last record never reaches it and Faust ends such partitions by a
heuristic (``detect_aborted_tx``: the consumer *position* passed the highwater while the changelog
queue stayed empty). The position moves when records are fetched, not when they are applied, so
records still on their way (or dropped at a rebalance) could be skipped: seen in ``make chaos`` (the
stuck-worker scenario), where a replacement worker recovered the ``tenants`` table without two
tenants' subscriptions and parked 57 calls of subscribed tenants; ``--until-idle`` exited 0 with them
neither rated nor dead-lettered (issue 9).

Three parts:

1. ``_stable_highwaters``: each changelog's end is asked of the broker (ListOffsets, read_committed).
   Faust read the consumer's cached last stable offset, unknown (-1) for a partition not fetched since
   it was assigned: recovery then crashed ("persisted offset is higher than the highwater") or took
   the changelog for empty.
2. ``_QuickRecoveryPoll``: Faust waits on its changelog queue with a hard-coded 5 s timeout and needs
   two empty waits before the heuristic ends a partition whose last record is a transaction marker, a
   10-15 s stall on every start; the wait is 0.5 s here. (A highwater at the last committed record
   instead, which needs no heuristic, ended recovery so early that the worker sometimes never resumed
   its input afterwards: reverted.)
3. ``_verified_on_recovery_completed``: before the worker resumes its input, every assigned changelog
   partition must have been applied exactly up to its last committed record (the store's persisted
   offset against the partition's tail, read read_committed by ``committed_tails``). Short of it
   (records skipped) or past it (local state holding writes no committed transaction made, e.g. state
   kept from another cluster), the process stops with ``EXIT_RETRY`` and without its clean-shutdown
   marker, so the next start rebuilds the state from the changelogs: a restart, never a lost call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import faust.stores.rocksdb as faust_rocksdb
import faust.tables.recovery as faust_recovery
import faust.transport.drivers.aiokafka as faust_aiokafka
from confluent_kafka import Consumer, KafkaError, TopicPartition

from pipeline.crashpoints import CRASH_AT, armed
from pipeline.errors import RetryableError
from pipeline.stream.guard import die

TP = tuple[str, int]
_bootstrap = ""


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


async def _tails(tps: Iterable[Any]) -> dict[TP, tuple[int, int | None]]:
    keys = [(tp.topic, tp.partition) for tp in tps]
    return await asyncio.get_running_loop().run_in_executor(None, committed_tails, _bootstrap, keys)


class _QuickRecoveryPoll:
    """Part 2: Faust's recovery module sees this instead of ``asyncio``; only ``wait_for`` differs.
    Ending recovery still requires the consumer position to have reached the highwater, and part 3
    checks what was applied, so a shorter wait cannot end recovery with records missing unnoticed."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(aw: Any, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(aw, timeout=min(timeout, 0.5) if timeout else timeout)


async def _stable_highwaters(self: Any, partitions: Any) -> Any:
    """Part 1. The consumer is read_committed, so ListOffsets answers the last stable offset itself."""
    return await self._ensure_consumer().end_offsets(list(partitions))


_original_on_recovery_completed = faust_recovery.Recovery.on_recovery_completed


async def _verified_on_recovery_completed(self: Any, generation_id: int = 0) -> None:
    """Part 3."""
    if self.app.consumer_generation_id == generation_id and self.active_tps:
        tps = sorted(self.active_tps)
        try:
            tails = await _tails(tps)
        except Exception as exc:  # inside Faust's recovery task an exception would only stop recovery
            die(f"cannot check changelog recovery: {type(exc).__name__}: {exc}", exc)
        wrong = []
        for tp in tps:
            applied = self.tp_to_table[tp].persisted_offset(tp)
            last = tails[(tp.topic, tp.partition)][1]
            if applied != last:
                wrong.append(f"{tp.topic}/{tp.partition} applied to {applied}, committed to {last}")
        if wrong:
            die(f"changelog recovery incomplete: {'; '.join(wrong[:3])}")
    global _skip_last_records
    _skip_last_records = False
    await _original_on_recovery_completed(self, generation_id)


# Fault injection (crash point ``recovery-short``): the first recovery of the process loses the last
# record of every batch it applies, as when Faust skipped records it had fetched.
_skip_last_records = False
_original_apply_changelog_batch = faust_rocksdb.Store.apply_changelog_batch


def _apply_changelog_batch(self: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    if _skip_last_records:
        events = list(batch)
        last = {event.message.tp: i for i, event in enumerate(events)}
        batch = [event for i, event in enumerate(events) if i != last[event.message.tp]]
    _original_apply_changelog_batch(self, batch, *args, **kwargs)


def install(bootstrap: str) -> None:
    """Patch Faust's recovery for this process (the stream worker's) against ``bootstrap``."""
    global _bootstrap, _skip_last_records  # one broker per worker process
    _bootstrap = bootstrap
    if CRASH_AT and armed("recovery-short"):
        _skip_last_records = True
        faust_rocksdb.Store.apply_changelog_batch = _apply_changelog_batch  # type: ignore[method-assign]
    faust_recovery.asyncio = _QuickRecoveryPoll()  # type: ignore[assignment]
    faust_aiokafka.AIOKafkaConsumerThread._highwaters = _stable_highwaters  # type: ignore[method-assign]
    faust_recovery.Recovery.on_recovery_completed = _verified_on_recovery_completed  # type: ignore[method-assign]
