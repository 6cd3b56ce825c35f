"""Library log lines that are expected in a healthy run, demoted to DEBUG in one place.

An ERROR or WARNING line must mean something is wrong. Faust and aiokafka log a few things at those
levels that, in this pipeline, are normal operation; each rule below matches exactly one such message
and says why it is expected (docs/decisions.md, "Quiet logs"). A matching record is demoted to DEBUG:
it still shows with ``CALLMETER_LOG_LEVEL=debug``. Everything else those libraries log, including
other messages of the same loggers, stays at its level. The filters sit on the emitting loggers, so
they survive Faust replacing the root handlers when its worker starts.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import NamedTuple

# Set once this process has begun to stop (the stream worker's shutdown: pipeline/stream/runner.py).
_STOPPING = threading.Event()


def stopping() -> None:
    """This process is stopping on purpose: rules marked ``when_stopping`` apply from now on."""
    _STOPPING.set()


class Expected(NamedTuple):
    logger: str
    pattern: re.Pattern[str]
    why: str
    when_stopping: bool = False  # expected only while the process stops; a fault at any other time


_COORDINATOR = "aiokafka.consumer.group_coordinator"
# The end of a run of several worker processes: the first to stop leaves the group, the others rejoin
# while they stop too, and a process whose Kafka client is already closing fails the offset fetch of
# its new assignment ("Connection ... closed"), marks the coordinator dead and cannot send LeaveGroup
# (seen in the broker's log: LeaveGroup of one member, the group stabilised with the other, its fetch
# failed 7 ms later). Its partitions' transactions were committed before they were revoked and the
# new assignment is never processed, so nothing is lost; the group drops the member after its session
# timeout. The same messages at any other time are a broker or network fault and stay loud (and keep
# the worker from vouching for its local state, pipeline/stream/stats.py).
_STOPPING_RACE = "a process stopping while the group rebalances around another that stopped first"

EXPECTED = (
    Expected(
        "faust.transport.drivers.aiokafka",
        re.compile(
            r"^Exception in begin_transaction for transaction \S+ exception Invalid state transition "
            r"TransactionState\.IN_TRANSACTION -> TransactionState\.IN_TRANSACTION$"
        ),
        # At every rebalance Faust "starts" the transactional producer of every assigned partition again
        # (TransactionManager.on_rebalance -> maybe_begin_transaction). A producer kept across the
        # rebalance already has its transaction open (pipeline/stream/fencing.py keeps it on purpose),
        # so aiokafka refuses to begin a second one and Faust logs the refusal. The open transaction is
        # the one the partition's events use; nothing failed. A producer that did not start at all is
        # caught by fencing.py, which stops the worker.
        "a rebalance re-begins transactions that are already open",
    ),
    Expected(
        "faust.tables.recovery",
        re.compile(r"^Error in recovery dictionary changed size during iteration$"),
        # Faust's detect_aborted_tx iterates the recovery highwaters while it awaits the consumer's
        # position; a rebalance that changes the assignment meanwhile changes that dict. Faust catches
        # the error and repeats the check 0.5 s later (pipeline/stream/recovery.py part 2), and part 3
        # there refuses to end recovery unless every changelog was applied exactly to its committed end.
        "a rebalance during changelog recovery; Faust repeats the check",
    ),
    Expected(
        "faust.tables.recovery",
        re.compile(
            r"^Error in recovery IllegalStateError: "
            r"Partition TP\(topic='[^']+', partition=\d+\) is not assigned$"
        ),
        # The same check during the same kind of rebalance: the partition whose position it asks for
        # was just revoked. Repeated 0.5 s later over the new assignment, and verified as above.
        "a rebalance revoked a partition while recovery checked it; Faust repeats the check",
    ),
    Expected(
        "faust.transport.drivers.aiokafka",
        re.compile(r"Has not committed .* (at all since worker start|\(last commit )", re.DOTALL),
        # Faust's livelock detector reads tp_last_committed_at, which only its non-transactional commit
        # path sets. Under exactly_once every commit is a transaction (send_offsets_to_transaction), so
        # after broker_commit_livelock_soft_timeout (5 min) of work on a backlog every busy partition is
        # reported "(report as bug)" although it commits every second. The real check is ours: the
        # stall watchdog (pipeline/stream/watch.py) stops a worker whose committed offsets do not move
        # for stall_timeout_seconds with input waiting.
        "Faust's commit livelock check does not see transactional commits",
    ),
    Expected(
        _COORDINATOR,
        re.compile(r"^Heartbeat failed for group \S+ because it is rebalancing$"),
        # Every worker process that joins or leaves the group (each start and end of a run with several
        # processes) makes the others rejoin; their next heartbeat is answered "rebalance in progress".
        # That is the group protocol's normal signal to rejoin, not a fault.
        "the group protocol's signal to rejoin after a member came or went",
    ),
    Expected(
        _COORDINATOR,
        re.compile(
            r"^Error sending OffsetFetchRequest\S* to node \S+ \[KafkaConnectionError: Connection at \S+ "
            r"closed\] -- marking coordinator dead$"
        ),
        _STOPPING_RACE,
        when_stopping=True,
    ),
    Expected(
        _COORDINATOR,
        re.compile(r"^Marking the coordinator dead \(node \S+\)for group \S+\.$"),
        _STOPPING_RACE,
        when_stopping=True,
    ),
    Expected(_COORDINATOR, re.compile(r"^LeaveGroup request failed: "), _STOPPING_RACE, when_stopping=True),
)


class _DemoteExpected(logging.Filter):
    def __init__(self, rules: list[Expected]) -> None:
        super().__init__()
        self.rules = rules

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        text = record.getMessage()
        stopping = _STOPPING.is_set()
        if not any(rule.pattern.search(text) for rule in self.rules if stopping or not rule.when_stopping):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # Handlers set up by basicConfig have no level of their own: drop it unless debugging.
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def install() -> None:
    """Attach the filters (idempotent)."""
    by_logger: dict[str, list[Expected]] = {}
    for rule in EXPECTED:
        by_logger.setdefault(rule.logger, []).append(rule)
    for name, rules in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DemoteExpected) for f in logger.filters):
            logger.addFilter(_DemoteExpected(rules))
