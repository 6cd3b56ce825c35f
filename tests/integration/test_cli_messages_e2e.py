"""The command line as a new user meets it: one line and a non-zero exit for what is wrong, never a
traceback, never a silent success, never a message that says more (or other) than what happened."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli import callmeter
from tests.integration.eventfiles import call, prov, write_events

pytestmark = pytest.mark.integration

SUB = prov(
    "msg-sub", "msg", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="GB"
)
CALL = call("msg-call", "msg", "2026-11-02T10:00:00Z", 60)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a refused command: exactly one `callmeter: error:` line, nothing else."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("callmeter: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def run(env: dict[str, str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


# -- simulate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--tenants", "0", "argument --tenants: must be at least 1, not 0"),
        ("--calls", "-5", "argument --calls: must be at least 0, not -5"),
        (
            "--duplicate-rate",
            "2",
            "argument --duplicate-rate: must be a share from 0 to 1 (0.02 = 2 %), not 2",
        ),
        (
            "--invalid-rate",
            "-0.5",
            "argument --invalid-rate: must be a share from 0 to 1 (0.02 = 2 %), not -0.5",
        ),
    ],
)
def test_simulate_refuses_arguments_out_of_range(
    cm_env: dict[str, str], tmp_path: Path, flag: str, value: str, says: str
) -> None:
    out = tmp_path / "sim.jsonl"
    proc = callmeter(cm_env, "simulate", flag, value, "--out", str(out), check=False)
    assert proc.returncode == 2
    assert one_error_line(proc) == f"callmeter: error: {says} (see callmeter --help)"
    assert not out.exists()


def test_simulate_without_a_destination_is_a_usage_error(cm_env: dict[str, str]) -> None:
    proc = callmeter(cm_env, "simulate", "--calls", "3", check=False)
    assert proc.returncode == 2
    assert "one of the arguments --out --produce is required" in one_error_line(proc)


# -- produce -------------------------------------------------------------------------------------------


def test_produce_names_the_line_that_is_not_utf8(cm_env: dict[str, str], tmp_path: Path) -> None:
    events = tmp_path / "latin1.jsonl"
    events.write_bytes(
        json.dumps(SUB).encode() + b"\n" + json.dumps(CALL).replace("msg", "m\u00e9g").encode("latin-1")
    )
    proc = callmeter(cm_env, "produce", str(events), check=False)
    assert proc.returncode == 1
    assert one_error_line(proc).startswith(
        f"callmeter: error: {events}:2: not UTF-8 text (byte 0xe9 at column "
    )


def test_produce_of_a_directory_says_it_is_a_directory(cm_env: dict[str, str], tmp_path: Path) -> None:
    proc = callmeter(cm_env, "produce", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert one_error_line(proc) == (
        f"callmeter: error: {tmp_path} is a directory; produce takes JSON-lines files "
        "(or - for standard input)"
    )


def test_produce_reads_standard_input_and_consume_shows_it_decoded(cm_env: dict[str, str]) -> None:
    lines = (json.dumps(SUB) + "\n" + json.dumps(CALL) + "\n").encode()
    proc = run(cm_env, "produce", "-", stdin=lines)
    assert proc.returncode == 0, proc.stderr
    prefix = cm_env["CALLMETER_TOPIC_PREFIX"]
    assert proc.stdout == f"{prefix}calls=1 {prefix}provisioning=1\n"
    assert proc.stderr == ""  # no progress line when stderr is not a terminal

    proc = callmeter(cm_env, "consume", "calls")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["key"], r["record"], r["value"]["event_id"], r["value"]["ended_at"]) for r in records] == [
        ("msg", "CallRecord", "msg-call", "2026-11-02T10:01:00.000Z")
    ]
    assert proc.stderr == f"callmeter: 1 record from {prefix}calls (3 partitions, committed records)\n"

    # A bad line on standard input is named as such, and nothing is published.
    proc = run(cm_env, "produce", "-", stdin=lines + b"{oops\n")
    assert proc.returncode == 1
    assert (
        one_error_line(proc)
        == "callmeter: error: <stdin>:3: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    assert len(callmeter(cm_env, "consume", "calls").stdout.splitlines()) == 1


def test_consume_says_when_a_topic_is_empty_and_refuses_unknown_topics(cm_env: dict[str, str]) -> None:
    callmeter(cm_env, "up")  # with CALLMETER_KAFKA set: creates the topics only
    proc = callmeter(cm_env, "consume", "deadletter")
    assert proc.stdout == ""
    assert proc.stderr == (
        f"callmeter: 0 records from {cm_env['CALLMETER_TOPIC_PREFIX']}deadletter "
        "(3 partitions, committed records)\n"
    )
    proc = callmeter(cm_env, "consume", "invoices", check=False)
    assert proc.returncode == 2
    assert one_error_line(proc).startswith(
        "callmeter: error: consume: unknown topic 'invoices'; one of: calls,"
    )


# -- invoice -------------------------------------------------------------------------------------------


def test_invoice_out_that_is_a_file_is_named(cm_env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "invoices"
    blocker.write_text("")
    proc = callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(blocker), check=False)
    assert proc.returncode == 1
    assert one_error_line(proc) == (
        f"callmeter: error: --out {blocker} is a file; it must name a directory "
        "(invoices are written as <invoice_id>.json)"
    )


def test_a_run_with_dead_letters_then_invoices_of_nothing_say_so(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # An empty ledger: nothing to invoice, said, exit 1 (docs/decisions.md, "Nothing to invoice").
    proc = callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(out), check=False)
    assert proc.returncode == 1
    assert one_error_line(proc) == (
        "callmeter: error: nothing to invoice: the ledger has no provisioning events yet "
        "(`callmeter produce` them, then run `callmeter worker --until-idle`)"
    )
    bad = dict(CALL, event_id="msg-bad", ended_at="2026-11-02T09:59:59.500Z")
    callmeter(cm_env, "produce", str(write_events(tmp_path / "e.jsonl", [SUB, CALL, bad])))
    callmeter(cm_env, "worker", "--until-idle")

    # Known tenants, none with a period starting in the month: a legitimate empty month, said, exit 0.
    proc = callmeter(cm_env, "invoice", "--period", "2026-05", "--out", str(out), check=False)
    assert (proc.returncode, proc.stdout) == (0, "")
    assert proc.stderr == (
        "callmeter: nothing to invoice: no subscription of the one tenant in the ledger has a "
        "billing period starting in 2026-05\n"
    )
    proc = callmeter(
        cm_env, "invoice", "--period", "2026-11", "--tenant", "nobody", "--out", str(out), check=False
    )
    assert proc.returncode == 1
    assert (
        one_error_line(proc)
        == "callmeter: error: nothing to invoice: the ledger has no provisioning events of tenant 'nobody'"
    )
    assert not out.exists() or not any(out.iterdir())
    proc = callmeter(cm_env, "invoice", "--period", "2026-11", "--out", str(out))
    assert proc.stdout == f"{out / 'msg-20261101.json'}  draft\n"

    # The dead letter, decoded, with the event it could not rate.
    letters = [json.loads(line) for line in callmeter(cm_env, "consume", "deadletter").stdout.splitlines()]
    assert [(d["value"]["reason"], d["original_decoded"]["value"]["event_id"]) for d in letters] == [
        ("ENDED_BEFORE_ANSWERED", "msg-bad")
    ]


# -- up and down ---------------------------------------------------------------------------------------


def _own_stack_env(cm_env: dict[str, str], data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in cm_env.items() if k != "CALLMETER_KAFKA"}
    env["CALLMETER_DATA_DIR"] = str(data_dir)
    return env


def test_down_with_nothing_running_says_so(cm_env: dict[str, str], tmp_path: Path) -> None:
    env = _own_stack_env(cm_env, tmp_path / "empty")
    proc = callmeter(env, "down")
    assert proc.stdout == f"kafka: nothing was running in {tmp_path / 'empty'}\n"


def test_up_refuses_a_second_stack_beside_a_running_broker(cm_env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "stack"
    env = _own_stack_env(cm_env, data)
    proc = callmeter(env, "up", "--brokers", "2", check=False)
    assert proc.returncode == 2
    assert one_error_line(proc) == (
        "callmeter: error: argument --brokers: must be 1 (one broker) or 3 (a cluster: replication 3, min "
        "ISR 2), not 2 (see callmeter --help)"
    )
    try:
        first = callmeter(env, "up").stdout
        proc = callmeter(env, "up", "--brokers", "3", check=False)
        assert proc.returncode == 1
        assert one_error_line(proc) == (
            f"callmeter: error: {data} holds a single broker ({data / 'kafka'}); a 3-broker cluster would "
            "start empty beside it: run `callmeter up` to start the broker, or use another --data-dir for "
            f"it, or `callmeter down` and delete {data / 'kafka'}"
        )
        assert not (data / "kafka-cluster").exists()
        assert callmeter(env, "up").stdout == first  # still the one broker
    finally:
        proc = callmeter(env, "down")
    assert proc.stdout == f"kafka stopped: the broker in {data / 'kafka'}\n"
    assert callmeter(env, "down").stdout == f"kafka: nothing was running in {data}\n"


# -- the worker's ports --------------------------------------------------------------------------------


@pytest.fixture
def taken() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def _hold(held: list[socket.socket], port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    held.append(sock)


@pytest.mark.parametrize(
    ("processes", "offset", "who"),
    [
        ("1", 0, "the worker's web port (CALLMETER_WORKER_WEB_PORT)"),
        ("2", 1, "the web port of stream worker process 1 (CALLMETER_WORKER_WEB_PORT + 1)"),
        ("2", 2, "the ledger sink's metrics port (CALLMETER_WORKER_WEB_PORT + 2)"),
    ],
)
def test_a_taken_worker_port_is_one_line_at_once(
    cm_env: dict[str, str], taken: list[socket.socket], processes: str, offset: int, who: str
) -> None:
    env = dict(cm_env, CALLMETER_WORKER_PROCESSES=processes)
    port = int(env["CALLMETER_WORKER_WEB_PORT"]) + offset
    _hold(taken, port)
    began = time.monotonic()
    proc = callmeter(env, "worker", "--until-idle", check=False, timeout=60)
    assert time.monotonic() - began < 15  # before: 71 s of restarts
    assert proc.returncode == 1
    assert one_error_line(proc) == (
        f"callmeter: error: cannot listen on 127.0.0.1:{port}, {who}: already in use by another program; "
        "stop what holds it or choose another base port (CALLMETER_WORKER_WEB_PORT / CALLMETER_API_PORT)"
    )


def test_a_tenant_api_port_among_the_worker_ports_is_refused(cm_env: dict[str, str]) -> None:
    base = int(cm_env["CALLMETER_WORKER_WEB_PORT"])
    env = dict(cm_env, CALLMETER_WORKER_PROCESSES="2", CALLMETER_API_PORT=str(base + 1))
    proc = callmeter(env, "worker", "--until-idle", check=False, timeout=60)
    assert proc.returncode == 2
    assert one_error_line(proc) == (
        f"callmeter: error: port {base + 1} is both the web port of stream worker process 1 "
        f"(CALLMETER_WORKER_WEB_PORT + 1) and the tenant API (CALLMETER_API_PORT): this run's processes use "
        f"{base}..{base + 2}; give the tenant API (CALLMETER_API_PORT) a port outside that range"
    )
