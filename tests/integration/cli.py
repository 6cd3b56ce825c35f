"""Run the real `callmeter` command line in a subprocess, as operators and scripts do."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "examples"


def callmeter(
    env: dict[str, str], *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # What the command said before it was killed is the diagnosis; pytest would show only its repr.
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        msg = f"callmeter {' '.join(args)} still running after {timeout:.0f} s:\n{said[-6000:]}"
        raise AssertionError(msg) from None
    if check and proc.returncode != 0:
        raise AssertionError(f"callmeter {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def worker_in_background(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`callmeter worker --until-idle` in its own session, stderr to ``log``, stdout (its JSON result
    line) on a pipe: for tests that do something to the world while it runs."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker", "--until-idle"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )


def ledger_report(env: dict[str, str]) -> dict[str, Any]:
    return json.loads(callmeter(env, "ledger").stdout)


def worker_stats(env: dict[str, str]) -> dict[str, Any]:
    return json.loads(callmeter(env, "worker", "--until-idle").stdout.strip().splitlines()[-1])


STATUSES = ("draft", "final")


def comparable(invoice: dict[str, Any]) -> dict[str, Any]:
    """Every field but description and generated_at (the examples' README), and but ``status``: callmeter's
    own field, which the examples' expected invoices and rating/'s reference computation do not decide.
    Where an invoice has it, it must be draft or final; ``read_invoices`` requires it of every invoice
    the job wrote, and tests that know which one it is assert it."""
    assert invoice.get("status", "draft") in STATUSES, invoice.get("status")
    out = {k: v for k, v in invoice.items() if k not in ("generated_at", "status")}
    out["lines"] = [{k: v for k, v in line.items() if k != "description"} for line in invoice["lines"]]
    return out


def read_invoices(directory: Path) -> dict[str, dict[str, Any]]:
    """The invoice files the job wrote; each says whether it is a draft or final."""
    invoices = {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}
    for name, invoice in invoices.items():
        assert invoice.get("status") in STATUSES, f"{name}: status {invoice.get('status')!r}"
    return invoices


class BackgroundWorker:
    """`callmeter worker` running in the background, with its HTTP port; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.url = f"http://127.0.0.1:{env['CALLMETER_WORKER_WEB_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path()

    def __enter__(self) -> BackgroundWorker:
        # A file, not a pipe: nobody reads a pipe while the worker runs, and a full one would block it.
        data_dir = Path(self.env["CALLMETER_DATA_DIR"])
        self.log = data_dir.with_name(f"{data_dir.name}-worker-{self.env['CALLMETER_WORKER_WEB_PORT']}.log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "worker"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        self.wait_for(lambda s: bool(s.get("ready")), what="worker ready")
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                body = resp.read()
                return resp.status, json.loads(body) if path != "/metrics" else body.decode()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self) -> dict[str, Any]:
        try:
            return self.get("/status")[1]
        except OSError:
            return {}

    def wait_for(self, predicate: Any, what: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"worker exited {self.proc.returncode} waiting for {what}:\n{err}")
            status = self.status()
            if status and predicate(status):
                return status
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status {self.status()}")


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from a Prometheus exposition: label string -> value."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name) :]] = float(value)
    return out


def reference_events(path: Path) -> tuple[list[Any], list[Any]]:
    """The calls and provisioning events of a JSON-lines file, as rating/ value types (for the
    reference batch computation the pipeline's invoices are compared with)."""
    from pipeline.records import call_from_record, provisioning_from_record
    from schemas.json_events import parse_json_event

    calls, provisioning = [], []
    for line in path.read_text().splitlines():
        name, record = parse_json_event(json.loads(line))
        if name == "CallRecord":
            calls.append(call_from_record(record))
        else:
            provisioning.append(provisioning_from_record(record))
    return calls, provisioning


def ledger_query(env: dict[str, str], sql: str) -> list[list[Any]]:
    """Rows of one SQL query against the ledger, from a subprocess: chdb lets one process open a path,
    and the test process must not hold it while `callmeter` commands run."""
    code = (
        "import json, sys\n"
        "from pipeline.settings import Settings\n"
        "from sinks.ledger import Ledger\n"
        "ledger = Ledger.open(Settings().clickhouse_dsn)\n"
        "print(json.dumps([list(r) for r in ledger.query(sys.argv[1])], default=str))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, sql], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"ledger query failed: {proc.stderr[-2000:]}")
    rows: list[list[Any]] = json.loads(proc.stdout)
    return rows


def delete_topics(env: dict[str, str]) -> None:
    """Delete every topic and consumer group of the env's prefix: the pipeline's next run meets a fresh
    cluster (offsets from 0, no changelogs) while the ledger in the data dir stays."""
    from confluent_kafka.admin import AdminClient

    from pipeline.settings import Settings

    # Pipeline topics carry the prefix; Faust's changelogs and leader topic carry the app id.
    prefixes = (
        env["CALLMETER_TOPIC_PREFIX"],
        f"{Settings(topic_prefix=env['CALLMETER_TOPIC_PREFIX']).app_id}-",
    )
    admin = AdminClient({"bootstrap.servers": env["CALLMETER_KAFKA"]})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefixes)]
    for future in admin.delete_topics(names, operation_timeout=30).values():
        future.result()
    deadline = time.monotonic() + 60
    while any(t.startswith(prefixes) for t in admin.list_topics(timeout=10).topics):
        if time.monotonic() > deadline:
            raise AssertionError(f"topics of {prefixes} still listed 60 s after their deletion")
        time.sleep(0.5)
