"""`callmeter status`'s judgement (pipeline/commands/status_report.py) and which processes it counts
(pipeline/identity.py), from in-memory answers: no broker, no worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.commands.status_report import KafkaView, LedgerNote, Probe, Thresholds, render
from pipeline.identity import describe, stranger
from pipeline.settings import Settings

NOW = 1_800_000_000.0
SETTINGS = Settings(topic_prefix="p.", data_dir=Path("/srv/metering"), worker_processes=2, partitions=6)
MINE = {**describe(SETTINGS, "status"), "kafka_cluster_id": "cluster-A"}
LIMITS = Thresholds(max_lag=10_000, max_duplicate_ratio=0.0001, max_ledger_age_seconds=300)
LEDGER = {
    "rated_calls": 7,
    "provisioning_events": 2,
    "last_event_ms": 0,
    "dead_letters": {},
    "duplicates": {},
}


def _worker(index: int, rated: int, dead: int = 0, **extra: Any) -> Probe:
    body = {
        "pipeline": {**MINE, "role": "stream", "index": index, "pid": 100 + index},
        "ready": True,
        "stats": {
            "rated": rated,
            "duplicates": {},
            "dead_letters": {"NEGATIVE_DURATION": dead} if dead else {},
        },
        "last_5_minutes": {"consumed": rated, "duplicates": 0, "dead_letters": dead},
        "event_time_lag_seconds": 0.5 * index,
        "parked_calls": 1,
        "assigned_calls_partitions": [index, index + 2],
        "sink": None,
        **extra,
    }
    return Probe("stream", index, f"http://127.0.0.1:{6066 + index}", body=body)


def _sink(**health: Any) -> Probe:
    state = {"rows_written": 14, "batches": 2, "last_write_unix": NOW - 5, "failing_since_unix": None,
             "failed_attempts": 0, "insert_errors": 0, "last_error": None, "stopped_error": None}  # fmt: skip
    body = {"pipeline": {**MINE, "role": "sink", "index": 2, "pid": 102}, "sink": {**state, **health}}
    return Probe("sink", 2, "http://127.0.0.1:6068", body=body)


def _render(probes: list[Probe], kafka: KafkaView | None = None, ledger: Any = None) -> tuple[str, list[str]]:
    view = kafka or KafkaView("127.0.0.1:9092", "cluster-A", lag={("p.calls", 0): 0})
    return render(SETTINGS, MINE, view, probes, LEDGER if ledger is None else ledger, LIMITS, NOW)


def test_every_worker_process_is_summed_and_the_sink_process_reported() -> None:
    text, problems = _render([_worker(0, 0), _worker(1, 5), _sink()])
    assert problems == []
    assert "worker processes: 2 of 2 answering" in text
    assert "since start: rated 5, duplicates 0, dead letters by reason none" in text
    assert "last 5 min: 5 events, 0 duplicates (0.0000%), 0 dead letters" in text
    assert "event-time lag 0.5 s (the most behind process); parked calls 2" in text
    assert "  process 1  http://127.0.0.1:6067  pid 101  ready  calls partitions 1,3  rated 5" in text
    assert "ledger sink: ledger sink process 2 at http://127.0.0.1:6068, pid 102" in text
    assert "  last write 5 s ago; 14 rows in 2 batches since it started; no failed insert attempts" in text
    assert text.endswith("\n\nHEALTHY")


@pytest.mark.parametrize(
    ("sink", "waiting", "expected"),
    [
        # Retrying a batch the ledger refuses: unhealthy at once, with the reason.
        (
            _sink(
                failing_since_unix=NOW - 300,
                failed_attempts=31,
                insert_errors=31,
                last_error="Code: 243. Cannot reserve space",
            ),
            {},
            "ledger sink failing inserts for 300 s (31 attempts): Code: 243. Cannot reserve space",
        ),
        (
            _sink(stopped_error="ledger sink failed: boom"),
            {},
            "ledger sink stopped: ledger sink failed: boom",
        ),
        # Nothing written for longer than the limit while outputs wait.
        (
            _sink(last_write_unix=NOW - 400),
            {("p.calls.rated", 0): NOW - 350},
            "ledger not written for 350 s while 1 output partition(s) wait",
        ),
        (
            _sink(last_write_unix=None),
            {("p.calls.rated", 0): NOW - 301, ("p.deadletter", 1): NOW - 10},
            "ledger not written for 301 s while 2 output partition(s) wait",
        ),
        (
            Probe("sink", 2, "http://127.0.0.1:6068", problem="does not answer within 3 s", frozen=True),
            {},
            "ledger sink (ledger sink process 2 at http://127.0.0.1:6068) does not answer within 3 s",
        ),
        (
            Probe("sink", 2, "http://127.0.0.1:6068", problem="DOWN (nothing answers)"),
            {},
            "ledger sink (ledger sink process 2 at http://127.0.0.1:6068) DOWN (nothing answers)",
        ),
    ],
)
def test_a_stalled_ledger_is_unhealthy_with_its_reason(
    sink: Probe, waiting: dict[tuple[str, int], float], expected: str
) -> None:
    kafka = KafkaView("127.0.0.1:9092", "cluster-A", waiting_since=waiting)
    text, problems = _render([_worker(0, 3), _worker(1, 4), sink], kafka)
    assert problems == [expected]
    assert text.splitlines()[-1] == f"UNHEALTHY: {expected}"


@pytest.mark.parametrize(
    ("last_write_ago", "oldest_waiting_ago"),
    [(5, 3600), (250, 299), (None, 200)],  # writing through a backlog; waiting less than the limit
)
def test_outputs_waiting_while_the_sink_writes_are_not_a_stall(
    last_write_ago: float | None, oldest_waiting_ago: float
) -> None:
    sink = _sink(last_write_unix=None if last_write_ago is None else NOW - last_write_ago)
    kafka = KafkaView("k", "cluster-A", waiting_since={("p.calls.rated", 0): NOW - oldest_waiting_ago})
    text, problems = _render([_worker(0, 1), _worker(1, 1), sink], kafka)
    assert problems == []
    assert (
        f"outputs waiting to be written: 1 partition(s), the oldest published {oldest_waiting_ago} s ago"
        in text
    )


def test_another_pipeline_on_the_ports_is_named_and_not_counted() -> None:
    theirs = "pipeline callmeter-other (Kafka cluster cluster-B, data dir /srv/other)"
    probes = [
        Probe("stream", 0, "http://127.0.0.1:6066", stranger=theirs),
        _worker(1, 4, dead=2),
        Probe("sink", 2, "http://127.0.0.1:6068", stranger=theirs),
    ]
    text, problems = _render(probes)
    assert "  not counted: http://127.0.0.1:6066 is answered by " + theirs in text
    assert "  not counted: http://127.0.0.1:6068 is answered by " + theirs in text
    assert "worker processes: 1 of 2 answering" in text and "since start: rated 4," in text
    assert problems == [
        "worker process 0 at http://127.0.0.1:6066 not answering as this pipeline (its port is taken by "
        "another process)",
        "2 dead letters in the last 5 minutes",
        "ledger sink (ledger sink process 2 at http://127.0.0.1:6068) not answering as this pipeline (its "
        "port is taken by another process)",
    ]


def test_no_worker_of_this_pipeline_and_an_empty_ledger() -> None:
    probes = [Probe("worker", 0, "http://127.0.0.1:6066", problem="DOWN (nothing answers)")]
    empty = LedgerNote("empty: nothing written yet (no ledger at /srv/metering/clickhouse)", problem=False)
    text, problems = _render(probes, ledger=empty)
    assert "worker: DOWN (no worker process of this pipeline answers at http://127.0.0.1:6066)" in text
    assert "ledger: empty: nothing written yet (no ledger at /srv/metering/clickhouse)" in text
    assert problems == [
        "no worker process of this pipeline answering at http://127.0.0.1:6066",
        "ledger sink (worker process 0 at http://127.0.0.1:6066) DOWN (nothing answers)",
    ]


def test_the_sink_inside_a_single_worker_process_is_read_from_its_status() -> None:
    failing = _sink(failing_since_unix=NOW - 12, failed_attempts=3, last_error="x").body or {}
    worker = _worker(0, 3, sink=failing["sink"])
    worker.role = "worker"
    text, problems = _render([worker])
    assert "ledger sink: worker process 0 at http://127.0.0.1:6066 (inside the worker), pid 100" in text
    assert problems == ["ledger sink failing inserts for 12 s (3 attempts): x"]


@pytest.mark.parametrize(
    ("theirs", "counted"),
    [
        ({**MINE, "role": "stream"}, True),
        ({**MINE, "kafka_cluster_id": None}, True),  # not reached Kafka yet: the same data dir
        ({**MINE, "kafka_cluster_id": None, "data_dir": "/srv/other"}, False),
        ({**MINE, "kafka_cluster_id": "cluster-B"}, False),  # same prefix, another cluster
        ({**MINE, "app_id": "callmeter-q"}, False),
        (None, False),  # an older worker, or not a callmeter process
        ({"something": "else"}, False),
    ],
)
def test_a_process_is_of_this_pipeline_by_cluster_and_application_not_by_port(
    theirs: dict[str, Any] | None, counted: bool
) -> None:
    assert (stranger(MINE, theirs) is None) == counted
