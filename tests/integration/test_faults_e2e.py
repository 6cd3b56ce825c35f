"""A fault at any numbered step of the worker's or the sink's commit protocol loses no call and
counts none twice; `worker --until-idle` recovers by itself (a fresh process) and exits 0 only when
everything is committed and written.

Each scenario runs a generated month (duplicates, bad records) through the real broker and the
embedded ClickHouse with a crash point armed (pipeline/crashpoints.py), then checks that every call
is either rated or dead-lettered exactly once and that every invoice equals rating/'s batch
computation. The slow scenarios (broker kill, rebalance storms, ...) are in `make chaos`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.commands.simulate import SimulationConfig, write_file
from pipeline.invoicing.completeness import ledger_lag
from pipeline.settings import Settings
from tests.integration.cli import callmeter, ledger_report, worker_stats
from tests.integration.test_exactly_once_e2e import pipeline_invoices, reference_invoices

pytestmark = pytest.mark.integration


def _unique(events: Path, kind: str) -> int:
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    return len({(r["tenant_id"], r["event_id"]) for r in rows if r["type"] == kind})


def assert_every_event_once(env: dict[str, str], events: Path, produced_before: int = 0) -> dict[str, Any]:
    """``produced_before``: records of ``events`` the test had already produced once before (each a
    duplicate when the file is produced)."""
    report = ledger_report(env)
    dead = report["dead_letters_by_reason"]
    # Generated = rated + dead-lettered + duplicates: every unique call is a ledger row or a dead letter.
    accepted = report["rated_calls"] + report["provisioning_events"]
    assert accepted + sum(dead.values()) == _unique(events, "call") + _unique(events, "provisioning"), report
    # ... and every other record is a duplicate the pipeline recorded exactly once (worker or ledger),
    # whatever crashed: the ledger alone accounts for every record generated.
    generated = len(events.read_text().splitlines()) + produced_before
    assert accepted + sum(dead.values()) + report["duplicates"] == generated, report
    assert pipeline_invoices(env, events.with_name("out"), "2026-10") == reference_invoices(events, 2026, 10)
    _record_counts(events, report, produced_before)
    return report


def _record_counts(events: Path, report: dict[str, Any], produced_before: int = 0) -> None:
    """With CALLMETER_SCENARIO_COUNTS=FILE, append the scenario's counts (for the issue note's table):
    generated = rated + dead-lettered + duplicates."""
    target = os.environ.get("CALLMETER_SCENARIO_COUNTS")
    if not target:
        return
    generated = len(events.read_text().splitlines()) + produced_before
    unique = _unique(events, "call") + _unique(events, "provisioning")
    row = {
        "scenario": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
        "generated": generated,
        "rated_calls": report["rated_calls"],
        "provisioning_accepted": report["provisioning_events"],
        "dead_lettered": sum(report["dead_letters_by_reason"].values()),
        "duplicates": report["duplicates"],
    }
    assert generated - unique == report["duplicates"]
    with Path(target).open("a") as out:
        out.write(json.dumps(row) + "\n")


def _month(tmp_path: Path, seed: int) -> Path:
    events = tmp_path / "events.jsonl"
    write_file(
        SimulationConfig(
            tenants=3, calls=1500, duplicate_rate=0.05, late_rate=0.02, invalid_rate=0.01, seed=seed
        ),
        events,
    )
    return events


@pytest.mark.parametrize(
    "crash_at",
    [
        "worker-4-state-written:300:raise",  # an exception inside an agent, after its state writes
        pytest.param("worker-5-output-sent:700:raise", marks=pytest.mark.chaos),
        pytest.param("after-event:500:raise", marks=pytest.mark.chaos),
        pytest.param("worker-4-state-written:900:kill", marks=pytest.mark.chaos),  # SIGKILL mid-event
        # SIGKILL right after a commit: no table write may be left behind
        pytest.param("worker-6-committed:2:kill", marks=pytest.mark.chaos),
        "sink-3-inserted:1:kill",  # SIGKILL between the ledger insert and the offset commit
        # Faust drops a fetched record before the agent (seen after a broker loss): Faust would commit
        # past it; the worker must notice the hole and restart from the last commit.
        "consumer-skip:400",
    ],
)
def test_fault_at_a_protocol_step_loses_and_doubles_nothing(
    cm_env: dict[str, str], tmp_path: Path, crash_at: str
) -> None:
    events = _month(tmp_path, seed=sum(map(ord, crash_at)))
    callmeter(cm_env, "produce", str(events))
    env = dict(cm_env, CALLMETER_CRASH_AT=crash_at)
    proc = callmeter(env, "worker", "--until-idle")
    assert "restarting" in proc.stderr, proc.stderr[-2000:]  # the crash point fired and was recovered
    assert_every_event_once(cm_env, events)
    # A second run finds nothing to do and changes nothing.
    before = ledger_report(cm_env)
    stats = worker_stats(cm_env)
    assert stats["rated"] == 0
    assert ledger_report(cm_env) == before


@pytest.mark.chaos
def test_a_worker_stuck_mid_event_is_stopped_and_replaced(cm_env: dict[str, str], tmp_path: Path) -> None:
    """A worker alive but stuck (heartbeats on, nothing committed) must not hang the run.
    The stall watchdog stops it with a line naming the partitions; its replacement finishes."""
    events = _month(tmp_path, seed=606)
    callmeter(cm_env, "produce", str(events))
    env = dict(
        cm_env, CALLMETER_CRASH_AT="worker-5-output-sent:400:hang", CALLMETER_STALL_TIMEOUT_SECONDS="8"
    )
    proc = callmeter(env, "worker", "--until-idle", timeout=600)
    assert "no input committed for" in proc.stderr, proc.stderr[-2000:]
    assert "restarting" in proc.stderr
    assert_every_event_once(cm_env, events)


def test_copies_of_an_invalid_event_are_duplicates_and_a_corrected_resend_is_rated(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.integration.eventfiles import call, prov, write_events

    good = call("c1", "d1", "2026-11-02T10:00:00Z", 60)
    bad = dict(good, ended_at="2026-11-02T09:59:59.000Z", started_at="2026-11-02T09:59:00.000Z")
    sub = prov(
        "s", "d1", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    callmeter(cm_env, "produce", str(write_events(tmp_path / "a.jsonl", [sub, bad, bad, bad])))
    stats = worker_stats(cm_env)
    assert stats["dead_letters"] == {"ENDED_BEFORE_ANSWERED": 1}
    assert stats["duplicates"] == {"call": 2}
    # The gateway fixes the record and resends it under the same id: it is rated.
    callmeter(cm_env, "produce", str(write_events(tmp_path / "b.jsonl", [good])))
    stats = worker_stats(cm_env)
    assert stats["rated"] == 1
    report = ledger_report(cm_env)
    assert (report["rated_calls"], report["dead_letters"], report["duplicates"]) == (1, 1, 2)


def test_poison_input_is_dead_lettered_and_nothing_else_is_disturbed(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """Random bytes, truncated Avro, a record of another schema, an empty value and a 500 kB string on the
    input topics: each becomes one dead letter with its reason; the good events around them are rated."""
    import os as _os
    from datetime import UTC, datetime

    from confluent_kafka import Producer

    from pipeline.records import call_to_record
    from pipeline.settings import Settings
    from rating.models import CallEvent
    from schemas.serde import Serde
    from tests.integration.eventfiles import call, prov, write_events

    sub = prov(
        "s", "pz", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    callmeter(
        cm_env,
        "produce",
        str(write_events(tmp_path / "a.jsonl", [sub, call("ok1", "pz", "2026-11-02T10:00:00Z", 60)])),
    )
    settings = Settings(topic_prefix=cm_env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    serde = Serde()
    at = datetime(2026, 11, 3, 10, tzinfo=UTC)
    huge = CallEvent("big", "pz", "c", None, "INBOUND", "+1", "+2", at, at, at, "ANSWERED", "g" * 500_000)
    valid = serde.encode("CallRecord", call_to_record(huge), settings.topics.calls)
    alert = {
        "alert_id": "a", "tenant_id": "pz", "kind": "USAGE_THRESHOLD", "period_start": at,
        "threshold_percent": 75, "used_seconds": 1, "included_seconds": 2, "message": "m", "emitted_at": at,
    }  # fmt: skip
    poison = [
        (settings.topics.calls, _os.urandom(200)),
        (settings.topics.calls, valid[: len(valid) // 3]),  # truncated Avro
        (settings.topics.calls, serde.encode("Alert", alert, settings.topics.alerts)),  # wrong schema
        (settings.topics.provisioning, b""),
    ]
    producer = Producer({"bootstrap.servers": cm_env["CALLMETER_KAFKA"], "message.max.bytes": 5_000_000})
    for topic, value in poison:
        producer.produce(topic, key=b"pz", value=value)
    producer.produce(settings.topics.calls, key=b"pz", value=valid)  # a 500 kB string: valid, rated
    producer.flush(10)
    callmeter(
        cm_env,
        "produce",
        str(write_events(tmp_path / "b.jsonl", [call("ok2", "pz", "2026-11-04T10:00:00Z", 30)])),
    )
    stats = worker_stats(cm_env)
    assert sum(stats["dead_letters"].values()) == len(poison), stats
    assert stats["rated"] == 3, stats
    report = ledger_report(cm_env)
    assert (report["rated_calls"], report["dead_letters"]) == (3, len(poison))
    assert report["billable_seconds_by_tenant"] == {"pz": 90}


def test_a_recovery_ending_short_of_the_changelog_is_redone(cm_env: dict[str, str], tmp_path: Path) -> None:
    """A worker must not consume input over a table that recovery left incomplete. Seen in make chaos:
    a replacement worker recovered ``tenants`` without two subscriptions and parked (never rated) 57
    calls of subscribed tenants, and `--until-idle` exited 0. Here the first recovery of the run is made
    to stop one committed record short (crash point ``recovery-short``): the check after recovery must
    catch it and restart the worker from the changelogs."""
    import shutil

    from tests.integration.eventfiles import call, prov, write_events

    sub = prov(
        "s", "rs", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    first = [call(f"a{i}", "rs", f"2026-11-02T10:{i:02d}:00Z", 60) for i in range(3)]
    callmeter(cm_env, "produce", str(write_events(tmp_path / "a.jsonl", [sub, *first])))
    assert worker_stats(cm_env)["rated"] == 3
    # A new host (or an unclean stop): the tables are rebuilt from their changelogs.
    shutil.rmtree(Path(cm_env["CALLMETER_DATA_DIR"]) / "worker")
    later = [call(f"b{i}", "rs", f"2026-11-03T10:{i:02d}:00Z", 30) for i in range(4)]
    callmeter(cm_env, "produce", str(write_events(tmp_path / "b.jsonl", [*later, first[0]])))
    proc = callmeter(dict(cm_env, CALLMETER_CRASH_AT="recovery-short:1:short"), "worker", "--until-idle")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["rated"], stats["parked"], stats["duplicates"]) == (4, 0, {"call": 1}), stats
    report = ledger_report(cm_env)
    assert (report["rated_calls"], report["billable_seconds_by_tenant"]) == (7, {"rs": 3 * 60 + 4 * 30})
    assert "changelog recovery incomplete" in proc.stderr, proc.stderr[-2000:]
    assert "restarting" in proc.stderr


def _state_lost_then_more(cm_env: dict[str, str], tmp_path: Path, tenant: str) -> tuple[Path, Path]:
    """A subscription and 3 calls run through, then the worker's local state is lost (a new host) and
    4 more calls plus a copy of the first arrive: the next start rebuilds every table from its
    changelog before it consumes them."""
    import shutil

    from tests.integration.eventfiles import call, prov, write_events

    sub = prov(
        "s", tenant, "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    first = [call(f"a{i}", tenant, f"2026-11-02T10:{i:02d}:00Z", 60) for i in range(3)]
    a = write_events(tmp_path / "a.jsonl", [sub, *first])
    callmeter(cm_env, "produce", str(a))
    assert worker_stats(cm_env)["rated"] == 3
    shutil.rmtree(Path(cm_env["CALLMETER_DATA_DIR"]) / "worker")
    later = [call(f"b{i}", tenant, f"2026-11-03T10:{i:02d}:00Z", 30) for i in range(4)]
    b = write_events(tmp_path / "b.jsonl", [*later, first[0]])
    callmeter(cm_env, "produce", str(b))
    return a, b


def _assert_rebuilt_without_a_restart(cm_env: dict[str, str], proc: Any, tenant: str) -> None:
    assert "restarting" not in proc.stderr, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["rated"], stats["parked"], stats["duplicates"]) == (4, 0, {"call": 1}), stats
    report = ledger_report(cm_env)
    assert (report["rated_calls"], report["billable_seconds_by_tenant"]) == (7, {tenant: 3 * 60 + 4 * 30})


def test_changelog_records_slow_to_reach_recovery_are_waited_for(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """On a busy machine the records a recovery fetched reach its queue seconds later. Faust's heuristic
    then declared the partitions recovered (the consumer's position had passed their end) and ignored
    the records still on their way; the check after recovery caught it and restarted the worker, round
    after round until it gave up. Crash point ``changelog-late``: the first recovery's changelog
    records arrive 2 s after they were fetched. Recovery must wait for them: no restart."""
    _state_lost_then_more(cm_env, tmp_path, "cl")
    proc = callmeter(dict(cm_env, CALLMETER_CRASH_AT="changelog-late:1"), "worker", "--until-idle")
    _assert_rebuilt_without_a_restart(cm_env, proc, "cl")


def test_input_waits_for_the_seek_to_the_committed_offsets(cm_env: dict[str, str], tmp_path: Path) -> None:
    """After recovery Faust resumed the input partitions and only then sought them to their committed
    offsets; records fetched in between reached the agent before Faust knew the committed offset, and
    the continuity check stopped the worker ("offsets 0..N never handled"): a restart with no fault, on
    the first start of two processes in the demo. Crash point ``seek-late``: every seek waits 3 s."""
    _state_lost_then_more(cm_env, tmp_path, "sk")
    proc = callmeter(dict(cm_env, CALLMETER_CRASH_AT="seek-late:1"), "worker", "--until-idle")
    _assert_rebuilt_without_a_restart(cm_env, proc, "sk")


def test_a_slow_assignment_keeps_the_worker_in_its_group(cm_env: dict[str, str], tmp_path: Path) -> None:
    """On a busy machine Faust's work on an assignment (a producer per partition, a database per table
    partition) took longer than the 10 s session timeout, during which aiokafka sent no heartbeat: the
    broker dropped the member ("local member_id was not recognized"), the group rebalanced again, the
    next assignment was as slow: rebalance storms and a 124 s stall until the watchdog. Crash point
    ``assign-slow``: every assignment of the first process takes 12 s longer. The worker must stay in
    its group and finish without a restart."""
    events = _month(tmp_path, seed=27)
    callmeter(cm_env, "produce", str(events))
    env = dict(cm_env, CALLMETER_CRASH_AT="assign-slow:1", CALLMETER_STALL_TIMEOUT_SECONDS="30")
    proc = callmeter(env, "worker", "--until-idle", timeout=600)
    assert "member_id was not recognized" not in proc.stderr, proc.stderr[-3000:]
    assert "restarting" not in proc.stderr, proc.stderr[-3000:]
    assert_every_event_once(cm_env, events)


def test_a_full_disk_during_recovery_stops_the_worker_and_says_so(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """Recovered records that cannot be written (the disk is full) were only logged by Faust, which
    tried again every half second: the worker stayed in recovery, with "No space left on device" in a
    warning, until the stall watchdog stopped it for "no input committed". Crash point
    ``recovery-write``: every write of recovered state fails in the first process. It must stop at
    once naming the cause, and its replacement finish the run."""
    _state_lost_then_more(cm_env, tmp_path, "df")
    env = dict(cm_env, CALLMETER_CRASH_AT="recovery-write:1", CALLMETER_STALL_TIMEOUT_SECONDS="10")
    proc = callmeter(env, "worker", "--until-idle")
    reasons = [line for line in proc.stderr.splitlines() if line.startswith("callmeter: error:")]
    assert len(reasons) == 1, proc.stderr[-3000:]
    assert "cannot write recovered table state" in reasons[0], reasons
    assert "No space left on device" in reasons[0], reasons
    assert proc.stderr.count("restarting in") == 1, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["rated"], stats["parked"], stats["duplicates"]) == (4, 0, {"call": 1}), stats
    report = ledger_report(cm_env)
    assert (report["rated_calls"], report["billable_seconds_by_tenant"]) == (7, {"df": 3 * 60 + 4 * 30})


def test_a_commit_held_up_past_ten_seconds_is_not_a_fault(cm_env: dict[str, str], tmp_path: Path) -> None:
    """On a busy machine Faust's commit timer wakes seconds late and a commit waits for the event in
    hand: transactions lived past the 10 s transaction timeout, the broker aborted them, and the worker
    restarted (a SIGKILL storm in make chaos-busy restarted once more than it was killed). Crash point
    ``commit-late``: the first commit with events to commit waits 12 s. No restart."""
    events = _month(tmp_path, seed=65)
    callmeter(cm_env, "produce", str(events))
    proc = callmeter(dict(cm_env, CALLMETER_CRASH_AT="commit-late:1"), "worker", "--until-idle")
    assert "restarting" not in proc.stderr, proc.stderr[-3000:]
    assert_every_event_once(cm_env, events)


def test_a_long_running_worker_replaces_a_sink_that_stopped(cm_env: dict[str, str], tmp_path: Path) -> None:
    """`callmeter worker` (no --until-idle, one process: the sink is a thread of it). The sink stopped
    on an error (seen after a broker bounce: its offset commit failed waiting for the coordinator) and
    the stream went on alone: nothing reached the ledger again until someone stopped the worker, and
    the bounce test waited in vain. A stopped sink must stop its process, which the supervisor
    restarts. Crash point ``sink-3-inserted:1:raise``: the first batch's insert raises in the sink."""
    events = _month(tmp_path, seed=66)
    callmeter(cm_env, "produce", str(events))
    log = tmp_path / "worker.log"
    env = dict(cm_env, CALLMETER_CRASH_AT="sink-3-inserted:1:raise")
    with log.open("wb") as err:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        settings = Settings(topic_prefix=cm_env["CALLMETER_TOPIC_PREFIX"], partitions=3)
        far = datetime(2100, 1, 1, tzinfo=UTC)
        deadline = time.monotonic() + 240
        time.sleep(5)
        while ledger_lag(settings, cm_env["CALLMETER_KAFKA"], far):
            assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"the ledger never caught up: {log.read_text()[-3000:]}"
            time.sleep(1)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
    text = log.read_text(errors="replace")
    assert text.count("restarting in") == 1, text[-3000:]
    assert_every_event_once(cm_env, events)
