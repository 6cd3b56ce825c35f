"""Expected library log lines are demoted, real problems stay loud, and the ledger's copies of known
events are one line per batch."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pipeline import logfilters
from pipeline.logfilters import EXPECTED, install
from sinks.sink import duplicates_summary

# -- expected library log lines ------------------------------------------------------------------------

EXPECTED_LINES = [
    (
        "faust.transport.drivers.aiokafka",
        logging.WARNING,
        "Exception in begin_transaction for transaction callmeter-1-3 exception Invalid state transition "
        "TransactionState.IN_TRANSACTION -> TransactionState.IN_TRANSACTION",
    ),
    ("faust.tables.recovery", logging.WARNING, "Error in recovery dictionary changed size during iteration"),
    (
        "faust.tables.recovery",
        logging.WARNING,
        "Error in recovery IllegalStateError: Partition TP(topic='callmeter-balances-changelog', "
        "partition=0) is not assigned",
    ),
    (
        "faust.transport.drivers.aiokafka",
        logging.ERROR,
        "[^--AIOKafkaConsumerThread]: Has not committed TP(topic='calls', partition=2) at all since worker "
        "start (started 5.02 minutes ago).\n\nThere are multiple possible explanations for this:\n\n1) ...",
    ),
    (
        "faust.transport.drivers.aiokafka",
        logging.ERROR,
        "[^--AIOKafkaConsumerThread]: Has not committed TP(topic='calls', partition=2) (last commit 5.01 "
        "minutes ago).\n\nThere are multiple possible explanations...",
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.WARNING,
        "Heartbeat failed for group callmeter because it is rebalancing",
    ),
]
REAL_PROBLEMS = [
    # Other failures of the same loggers stay loud.
    (
        "faust.transport.drivers.aiokafka",
        logging.WARNING,
        "Exception in begin_transaction for transaction callmeter-1-3 exception KafkaConnectionError",
    ),
    ("faust.tables.recovery", logging.WARNING, "Error in recovery 'NoneType' object is not subscriptable"),
    (
        "faust.transport.drivers.aiokafka",
        logging.ERROR,
        "[^--AIOKafkaConsumerThread]: Stream stopped processing, or is slow for "
        "TP(topic='calls', partition=2)",
    ),
    (
        "aiokafka.consumer.group_coordinator",
        logging.WARNING,
        "Heartbeat failed for group callmeter: coordinator (node 1) dead",
    ),
]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    install()
    handler = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize(("logger", "level", "text"), EXPECTED_LINES)
def test_expected_library_lines_are_not_shown(
    captured: list[logging.LogRecord], logger: str, level: int, text: str
) -> None:
    logging.getLogger(logger).log(level, "%s", text)
    assert captured == []


@pytest.mark.parametrize(("logger", "level", "text"), REAL_PROBLEMS)
def test_other_lines_of_those_loggers_stay_at_their_level(
    captured: list[logging.LogRecord], logger: str, level: int, text: str
) -> None:
    logging.getLogger(logger).log(level, "%s", text)
    assert [(r.levelno, r.getMessage()) for r in captured] == [(level, text)]


def test_expected_lines_still_show_when_debugging(captured: list[logging.LogRecord]) -> None:
    logging.getLogger().setLevel(logging.DEBUG)
    logging.getLogger("faust.tables.recovery").warning(
        "Error in recovery dictionary changed size during iteration"
    )
    assert [(r.levelname, r.getMessage()) for r in captured] == [
        ("DEBUG", "Error in recovery dictionary changed size during iteration")
    ]


STOPPING_RACE = [
    (
        logging.ERROR,
        "Error sending OffsetFetchRequest to node 1 [KafkaConnectionError: Connection at 127.0.0.1:34623 "
        "closed] -- marking coordinator dead",
    ),
    (logging.WARNING, "Marking the coordinator dead (node 1)for group callmeter."),
    (logging.ERROR, "LeaveGroup request failed: [Error 15] GroupCoordinatorNotAvailableError"),
]


@pytest.mark.parametrize(("level", "text"), STOPPING_RACE)
def test_a_group_closing_around_a_stopping_process_is_loud_until_it_stops(
    captured: list[logging.LogRecord], level: int, text: str
) -> None:
    logger = logging.getLogger("aiokafka.consumer.group_coordinator")
    try:
        logger.log(level, "%s", text)  # mid-run: a broker or network fault
        assert [(r.levelno, r.getMessage()) for r in captured] == [(level, text)]
        logfilters.stopping()
        logger.log(level, "%s", text)  # while this process stops on purpose: expected
        assert len(captured) == 1
    finally:
        logfilters._STOPPING.clear()


def test_every_rule_says_why() -> None:
    assert all(rule.why for rule in EXPECTED)


# -- the ledger's duplicate summary --------------------------------------------------------------------


def test_copies_the_ledger_already_held_are_one_line_per_batch() -> None:
    notes = [
        ("call", f"call t/c{i} from partition 1 offset {10 + i} (first seen at partition 1 offset {i})")
        for i in range(5)
    ]
    notes.append(
        (
            "provisioning with another payload",
            "provisioning t/sub from partition 1 offset 20 with another payload "
            "(first seen at partition 1 offset 0)",
        )
    )
    assert duplicates_summary(notes) == (
        "6 events already in the ledger, recorded as duplicates, not billed (call 5, provisioning with "
        "another payload 1): call t/c0 from partition 1 offset 10 (first seen at partition 1 offset 0); "
        "call t/c1 from partition 1 offset 11 (first seen at partition 1 offset 1); call t/c2 from partition "
        "1 offset 12 (first seen at partition 1 offset 2); and 3 more"
    )


def test_a_single_copy_is_shown_whole() -> None:
    assert duplicates_summary(
        [("call", "call t/c0 from partition 0 offset 9 (first seen at partition 0 offset 1)")]
    ) == (
        "1 event already in the ledger, recorded as duplicates, not billed (call 1): "
        "call t/c0 from partition 0 offset 9 (first seen at partition 0 offset 1)"
    )
