"""Closes what a previous owner of a partition left open before this worker writes to it.

Each input partition P has one transactional id (``{app}-{group}-{P}``), so every worker that ever owned P
writes as the same Kafka producer id, with a new epoch per start. Seen in ``make chaos`` (broker killed
with -9 and restarted): records that the worker had written in a transaction just before the kill were
later *committed by its replacement*. After the restart the transaction coordinator did not know that
transaction any more, so neither the timeout nor the replacement's InitProducerId aborted it: its records
stayed open on the output and changelog partitions under the same producer id, and the replacement's first
commit marker on each partition closed them as committed, outputs of events whose offsets were never
committed. The events were then processed a second time, so their records were in the topics twice
(docs/decisions.md has the incident).

Protocol, for every transactional producer this worker starts (on each assignment, before recovery
reads the changelogs and before any event):

1. Faust starts the producer (only a new one: a producer kept across a rebalance is this worker's own
   session, whose open transaction may hold events already handled). InitProducerId fences older
   epochs and completes every transaction the coordinator knows of (a commit in progress is finished,
   an open one aborted). A start that failed is fatal here (Faust only logs it and would go on without
   the producer); so is a sweep that fails or takes over a minute (a broker that went away again).
2. Inside a first transaction, one empty record is written to partition P of every topic the producer
   writes (outputs and changelogs) and the group's offsets are added, so every one of those partitions,
   and the group's offsets partition, is part of the transaction.
3. That transaction is aborted: its ABORT marker on each partition closes whatever this producer id left
   open there, as aborted. Nothing that can still be committed is touched: step 1 finished all of those.
   A crash before the abort leaves an open transaction that the next start aborts the same way.
4. The producer begins the transaction the events will use.

The empty records are in aborted transactions, so no read_committed reader (the sink, recovery, replay,
``status``) ever sees them; compaction removes them from the changelogs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka.structs import TopicPartition

from pipeline.stream.guard import die

log = logging.getLogger(__name__)

FENCE_KEY = b"callmeter-fence"

# Set by the worker: for a transactional id, the input partition P it serves, the topics (partition P of
# each) its producer writes and the input topics whose offsets it commits; None for Faust's other ids.
SweepFor = Callable[[str], "tuple[int, list[str], list[str]] | None"]
SWEEP_TIMEOUT_SECONDS = 60.0


async def abort_strays(
    producer: Any, partition: int, outputs: Iterable[str], inputs: Iterable[str], group: str
) -> None:
    """Steps 2-3 on an aiokafka transactional producer that has begun a transaction."""
    # The partition is in the transaction once its batch is accepted: wait for every delivery.
    deliveries = [await producer.send(topic, b"", key=FENCE_KEY, partition=partition) for topic in outputs]
    await asyncio.gather(*deliveries)
    offsets = {TopicPartition(topic, partition): 0 for topic in inputs}
    if offsets:
        await producer.send_offsets_to_transaction(offsets, group)
    await producer.abort_transaction()


async def start_closing_strays(
    manager: Any, tids: list[str], start: Callable[[Iterable[str]], Awaitable[None]]
) -> None:
    """Steps 1-4 for the ids Faust's ``TransactionManager._start_transactions`` (``start``) starts
    (overridden in stream/faust_seams.py)."""
    sweep_for: SweepFor | None = manager.app.sweep_for
    known = manager.producer._transaction_producers
    # Only producers started now. One kept across a rebalance (Faust "starts" every assigned id again)
    # is this worker's own session, and its open transaction may hold events already handled.
    fresh = [tid for tid in tids if tid not in known]
    await start(tids)
    if sweep_for is None:
        return
    for tid in fresh:
        sweep = sweep_for(tid)
        if sweep is None:
            continue
        partition, outputs, inputs = sweep
        producer = known.get(tid)
        if producer is None:
            die(f"the transactional producer {tid} did not start (see the warning above)")
        try:
            await asyncio.wait_for(
                abort_strays(producer, partition, outputs, inputs, manager.app.conf.id), SWEEP_TIMEOUT_SECONDS
            )
            await producer.begin_transaction()
        except Exception as exc:  # the producer's state is unknown: restart rather than write through it
            die(f"closing what {tid} left open failed: {type(exc).__name__}: {exc}", exc)
    log.info("closed stray transactions of %d producers", len(fresh))
