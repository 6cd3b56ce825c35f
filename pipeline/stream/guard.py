"""Keeps Faust from committing part of an event, and stops the process when an event fails.

Faust commits each partition's transaction on a timer, at a rebalance and at shutdown, from the same
event loop as the agent. The agent awaits between its state writes and its sends (a full producer
buffer suspends it), so without a guard a commit could land *between* them: the dedupe key committed,
the rated record not, and a crash before the next commit loses the call. The guard makes each event
one critical section with respect to commits (the Faust methods it runs in are overridden in
stream/faust_seams.py):

1. ``CommitGuard.batch()`` holds an asyncio lock while a batch of events is handled, and acks them
   before releasing it, so a commit sees either all of an event (writes, outputs, offset) or none.
2. Every Faust commit (``Consumer.force_commit``, ``guarded_commit``) takes the same lock first, lets
   the worker write what it writes once per commit (``MeterApp.before_commit``: the balances), then
   drains Faust's buffer of table writes into the transaction (``_drain_table_writes``: Faust itself
   does not).
3. A rebalance commits every transaction before partitions are revoked (``commit_then_revoke``).
   An event the agent took before the rebalance and that waited for the lock during that commit is
   not handled and not acked (``CommitGuard.current``, checked by stream/continuity.py; the agent's
   stream is Faust's ``noack()``, so Faust does not ack it behind the guard either): handled after
   the commit, its records went into a transaction no commit would close before the partitions were
   reassigned. On a partition the worker kept, the event came again after the rebalance and was
   handled a second time (a duplicate of itself), and the transaction holding both either committed
   them together or, on a busy machine, outlived the transaction timeout and stopped the worker.
4. An exception (or a cancellation) in the middle of an event, or a send that failed for good
   (``check_published``), *poisons* the guard: no commit happens after that, and the process leaves
   at once with ``EXIT_RETRY`` without writing its clean-shutdown marker. The open transactions are
   aborted by the broker when the next worker's producers fence them (same transactional ids), and
   the next start rebuilds local state from the changelogs, exactly as after a SIGKILL. Faust's own
   behaviour, restarting the agent and committing later offsets, is what lost calls before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from pipeline.crashpoints import CRASH_AT, armed, crash_point

log = logging.getLogger(__name__)

# The worker process exits with this code when it stopped on a fault that a fresh start recovers from
# (an agent exception, a stall, lost broker connection); `callmeter worker` restarts it.
EXIT_RETRY = 75


class CommitGuard:
    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self.poisoned = False
        # Called after each successful commit, under the lock (pipeline/runcounts.py).
        self.on_commit: Callable[[], None] | None = None
        # Whether events flow (set by the runner: Faust's flow control). Read when a batch gets the
        # lock: an event taken before a rebalance began is not handled (step 3).
        self.flowing: Callable[[], bool] = lambda: True
        self.current = True

    @property
    def lock(self) -> asyncio.Lock:
        # Created lazily inside the running loop (Faust's worker owns the loop).
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @contextlib.asynccontextmanager
    async def batch(self, events: list[Any]) -> AsyncIterator[None]:
        """A batch of events (``take_events``) as one critical section: all acked before a commit can
        see any of them, or the process leaves without committing (steps 1 and 4)."""
        async with self.lock:
            # No await between this and the agent's continuity check, which skips a stale batch.
            self.current = self.flowing()
            try:
                yield
            except BaseException as exc:
                self.poisoned = True
                first = events[0].message if events else None
                where = f"a batch from {first.topic}/{first.partition}@{first.offset}" if first else "a batch"
                die(f"stream agent failed on {where}: {type(exc).__name__}: {exc}", exc)
            if self.current:
                for event in events:
                    event.ack()


def die(reason: str, exc: BaseException | None = None) -> None:
    """Leave now, without committing anything or marking local state clean (see step 4)."""
    if exc is not None:
        log.error("fatal: %s", reason, exc_info=exc)
    sys.stderr.write(f"callmeter: error: {reason}; restarting from the last commit\n")
    sys.stderr.flush()
    logging.shutdown()
    os._exit(EXIT_RETRY)


async def _drain_table_writes(app: Any) -> None:
    """Hand every buffered table write to its transactional producer before the commit.

    Faust sends table (changelog) writes through a buffer drained by a background task, and under
    ``exactly_once`` it commits without flushing that buffer (only the non-transactional path
    flushes). A write still buffered at commit time lands in the *next* transaction, so a crash in
    between commits an event's offset and outputs without its state: a SUBSCRIPTION_STARTED accepted
    and in the ledger, but not in the ``tenants`` table, parks every later call of the tenant forever.
    Seen in the sink-kill fault test. Once drained, each write is in its producer's accumulator, and
    committing the transaction sends it before the commit marker.

    "Drained" includes the write the buffer's task has already taken from the queue but not yet handed
    to the producer: the queue is empty while that one is still on its way, and it then landed in the
    next transaction; a worker stopping after the commit lost it (the last balance changes of a run,
    missing after a rebuild from the changelogs). The task is idle again, waiting on its queue, once
    it has handed the write over."""
    buffer = app.producer.buffer
    deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_SECONDS
    while buffer.size or not _buffer_task_idle(buffer):
        if asyncio.get_running_loop().time() > deadline:
            msg = f"table writes not handed to the producer within {DRAIN_TIMEOUT_SECONDS:.0f} s"
            raise TimeoutError(msg)
        if buffer.size:
            await buffer.flush()
        else:
            await asyncio.sleep(0.001)


DRAIN_TIMEOUT_SECONDS = 60.0


def _buffer_task_idle(buffer: Any) -> bool:
    """Faust's buffer task waits on its queue's ``get`` between writes (ProducerBuffer._handle_pending);
    a stopped buffer has no task to wait for."""
    return bool(buffer.pending._getters) or buffer.state != "running"


async def guarded_commit(
    consumer: Any, commit: Callable[..., Awaitable[bool]], *args: Any, **kwargs: Any
) -> bool:
    """Step 2: Faust's ``Consumer.force_commit`` (``commit``) under the guard (faust_seams.py)."""
    guard: CommitGuard | None = consumer.app.guard
    if guard is None:
        return bool(await commit(*args, **kwargs))
    async with guard.lock:
        if guard.poisoned:
            return False
        pending = _commits_late and any(True for _ in consumer._filter_tps_with_pending_acks())
        if pending and armed("commit-late"):
            await asyncio.sleep(COMMIT_LATE_SECONDS)  # fault injection: a commit held up 12 s
        before_commit = consumer.app.before_commit
        try:
            if before_commit is not None:
                before_commit()
            await _drain_table_writes(consumer.app)
        except Exception as exc:  # the transaction would commit without state it must hold
            guard.poisoned = True
            die(f"could not prepare a commit: {type(exc).__name__}: {exc}", exc)
        committed = bool(await commit(*args, **kwargs))
        if committed and guard.on_commit is not None:
            guard.on_commit()  # still under the lock: exactly the events this commit made visible
        if CRASH_AT and committed:
            crash_point("worker-6-committed")
        return committed


async def commit_then_revoke(consumer: Any, revoked: Any, revoke: Callable[[Any], Awaitable[None]]) -> None:
    """Step 3 of the protocol: commit every transaction before a rebalance takes partitions away
    (``revoke`` is Faust's ``Consumer.on_partitions_revoked``).

    Under ``exactly_once`` Faust forgets the acked offsets of revoked partitions and stops their
    transactional producers without committing (the next owner fences them and the broker aborts the
    open transactions), while RocksDB keeps those transactions' table writes. A partition that came
    back to this worker later in the run then held dedupe keys of calls whose rated records were
    rolled back: lost calls, and a stall while the orphaned transactions timed out. Committing first
    leaves nothing in flight: the next owner starts exactly where this worker stopped, and the local
    state of every partition matches what was committed. (The eager protocol revokes every partition
    at each rebalance, so this is one commit per rebalance.)"""
    guard: CommitGuard | None = consumer.app.guard
    if guard is not None and not guard.poisoned and consumer.app.in_transaction:
        try:
            await consumer.force_commit()
        except Exception as exc:  # a commit that fails here must not leave the state half-trusted
            guard.poisoned = True
            die(f"commit before a rebalance failed: {type(exc).__name__}: {exc}", exc)
    await revoke(revoked)


# How long the broker lets a transaction stay open before it aborts it (and fences its producer). A
# transaction lasts about one commit interval (1 s) on a quiet machine, but on a busy one Faust's commit
# timer wakes seconds late and the commit itself waits for the event in hand and several round trips:
# 10 s, the value before, aborted healthy transactions and restarted the worker (make chaos-busy, a
# SIGKILL storm). A worker that died mid-transaction does not hold its successor up meanwhile: the
# successor's producers start with InitProducerId on the same transactional ids, which aborts what was
# left open at once (stream/fencing.py), before its recovery reads the changelogs. A transaction that
# does exceed the timeout is aborted by the broker and its commit fails, which stops the worker and
# restarts it from the last commit (step 4 above). (Crash point ``commit-late``: the first commit of the
# process with events to commit waits 12 s, holding the lock.)
TRANSACTION_TIMEOUT_MS = 60_000
COMMIT_LATE_SECONDS = 12.0
_commits_late = CRASH_AT.startswith("commit-late")


def with_transaction_timeout(app: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Faust's producer settings (``Producer._settings_extra``) with the transaction timeout above."""
    settings = dict(extra)
    if app.in_transaction:
        settings["transaction_timeout_ms"] = TRANSACTION_TIMEOUT_MS
    return settings


def check_published(app: Any, fut: Any, message: Any) -> None:
    """Step 4 for a send that failed for good (fenced after a broker loss, delivery timed out): the
    process stops. Called after Faust's ``Topic._on_published``.

    Under ``exactly_once`` every output and changelog record belongs to its partition's transaction: one
    lost leaves the transaction unfit to commit. Faust only logged it, and the agent then waited without
    end on a producer buffer that never drained (make chaos, broker killed -9: two minutes until the
    stall watchdog). Leaving at once restarts from the last commit instead."""
    guard: CommitGuard | None = app.guard
    if guard is None or fut.cancelled() or fut.exception() is None:
        return
    guard.poisoned = True
    exc = fut.exception()
    die(f"a send to {message.message.channel.get_topic_name()} failed: {type(exc).__name__}: {exc}")
