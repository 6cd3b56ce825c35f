"""`callmeter notify` delivers the alerts a real worker sent to a webhook that fails, exactly
once at the receiver's dedup by idempotency key, also across a SIGKILL of the notifier."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from pipeline.notify.delivery import KEY_HEADER, SIGNATURE_HEADER, alert_body, idempotency_key, verify
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from schemas.serde import Serde
from tests.conftest import free_port
from tests.integration.cli import callmeter, worker_stats
from tests.integration.test_balances_alerts_e2e import T0, call, read_alerts, subscription, write

pytestmark = pytest.mark.integration

SECRET = "whsec-test"


class Receiver:
    """A webhook endpoint on a thread. ``script[n]`` says what the (n+1)-th POST gets: "500", "drop"
    (connection closed, no answer), "slow" (stored, answered after the notifier's timeout), "hold"
    (stored, answered once ``release`` is set); later posts get 200. Dedup by idempotency key."""

    def __init__(self, script: dict[int, str]) -> None:
        self.script = script
        self.raw: list[tuple[str, bytes, str]] = []  # every POST: key, body, signature
        self.stored: dict[str, bytes] = {}  # the dedup: first body per key
        self.duplicates = 0
        self.holding = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    n = len(receiver.raw)
                    receiver.raw.append((self.headers[KEY_HEADER], body, self.headers[SIGNATURE_HEADER]))
                action = receiver.script.get(n, "ok")
                if action == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                receiver.store(self.headers[KEY_HEADER], body)
                if action == "slow":
                    time.sleep(2.5)
                if action == "hold":
                    receiver.holding.set()
                    receiver.release.wait(60)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/callmeter"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def store(self, key: str, body: bytes) -> None:
        with self.lock:
            if key in self.stored:
                self.duplicates += 1
            else:
                self.stored[key] = body

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def notify_env(cm_env: dict[str, str]) -> Iterator[dict[str, str]]:
    yield dict(
        cm_env,
        CALLMETER_NOTIFY_SECRET=SECRET,
        CALLMETER_NOTIFY_TIMEOUT_SECONDS="1",
        CALLMETER_NOTIFY_INITIAL_BACKOFF_SECONDS="0.1",
        CALLMETER_NOTIFY_MAX_BACKOFF_SECONDS="0.4",
    )


def test_alerts_delivered_exactly_once_through_failures_and_a_kill(
    notify_env: dict[str, str], tmp_path: Path
) -> None:
    # starter: 18000 s included; three calls cross 75, 90 and 100 % for each of four tenants, and the
    # first one's rate projects an overage: 16 alerts.
    tenants = ["ka", "kb", "kc", "kd"]
    events = [subscription(t, "starter") for t in tenants]
    for t in tenants:
        events += [
            call(t, f"{t}1", 13500),
            call(t, f"{t}2", 2700, T0 + timedelta(days=1)),
            call(t, f"{t}3", 1800, T0 + timedelta(days=2)),
        ]
    callmeter(notify_env, "produce", write(tmp_path / "a.jsonl", events))
    worker_stats(notify_env)
    alerts = read_alerts(notify_env)
    assert len(alerts) == 16
    # The 1st alert: a 500, a dropped connection, an answer after the timeout (stored by the receiver),
    # then a 2xx. Two more go through; the notifier is killed while the 4th waits for its answer.
    script = {0: "500", 1: "drop", 2: "slow", 6: "hold"}
    with Receiver(script) as receiver:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "notify", "--webhook", receiver.url],
            env=notify_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert receiver.holding.wait(90), "the notifier never reached the 4th alert"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        receiver.release.set()
        assert len(receiver.raw) == 7
        # Restarted: the 4th alert is sent again (never acknowledged), then the twelve not yet sent.
        out = callmeter(notify_env, "notify", "--webhook", receiver.url, "--until-idle")
        assert json.loads(out.stdout) == {"attempts": 13, "delivered": 13}
        # Nothing is left: a third run delivers nothing.
        out = callmeter(notify_env, "notify", "--webhook", receiver.url, "--until-idle")
        assert json.loads(out.stdout) == {"attempts": 0, "delivered": 0}
    assert len(receiver.raw) == 20  # at least once: 16 alerts, 3 retries of the 1st, the 4th twice
    assert all(verify(SECRET.encode(), body, sig) for _key, body, sig in receiver.raw)
    assert all(key == json.loads(body)["idempotency_key"] for key, body, _sig in receiver.raw)
    # Exactly once after dedup: one stored body per alert, the body the alert makes.
    assert receiver.stored == {idempotency_key(a): alert_body(a) for a in alerts}
    assert receiver.duplicates == 2  # the slow answer's retry, the killed notifier's last alert


def _alert(tenant: str, threshold: int) -> dict[str, Any]:
    return {
        "alert_id": f"{tenant}-20261101-USAGE_THRESHOLD-{threshold}",
        "tenant_id": tenant,
        "kind": "USAGE_THRESHOLD",
        "period_start": T0.replace(day=1, hour=0),
        "threshold_percent": threshold,
        "used_seconds": 180 * threshold,
        "included_seconds": 18000,
        "message": f"{tenant} crossed {threshold} %",
        "emitted_at": T0,
        "crossed_at": T0,
    }


def test_an_endpoint_that_keeps_failing_stops_the_notifier_without_skipping(
    notify_env: dict[str, str],
) -> None:
    settings = Settings(topic_prefix=notify_env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    ensure_topics(settings, notify_env["CALLMETER_KAFKA"])
    producer = Producer({"bootstrap.servers": notify_env["CALLMETER_KAFKA"]})
    serde = Serde()
    for threshold in (75, 90):  # one key, one partition: offsets 0 and 1
        value = serde.encode("Alert", _alert("zz", threshold), settings.topics.alerts)
        producer.produce(settings.topics.alerts, value, b"zz")
    assert producer.flush(30) == 0
    env = dict(notify_env, CALLMETER_NOTIFY_MAX_ATTEMPTS="3")
    with Receiver(dict.fromkeys(range(3), "500")) as receiver:
        proc = callmeter(env, "notify", "--webhook", receiver.url, "--until-idle", check=False)
        assert proc.returncode == 1
        # Each failed attempt is logged as a warning; the error is one line, the last.
        errors = [line for line in proc.stderr.splitlines() if line.startswith("callmeter:")]
        assert len(errors) == 1 and proc.stderr.splitlines()[-1] == errors[0], proc.stderr
        assert errors[0].startswith(
            "callmeter: error: webhook refused alert zz-20261101-USAGE_THRESHOLD-75 at "
        )
        assert errors[0].endswith("@0 3 times (last: HTTP 500)")
        # Nothing was committed: the next run starts with the refused alert.
        out = callmeter(env, "notify", "--webhook", receiver.url, "--until-idle")
        assert json.loads(out.stdout) == {"attempts": 2, "delivered": 2}
    assert [json.loads(body)["alert_id"] for _k, body, _s in receiver.raw] == [
        "zz-20261101-USAGE_THRESHOLD-75",
    ] * 4 + ["zz-20261101-USAGE_THRESHOLD-90"]


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [
        ("http://127.0.0.1:{port}/x", SECRET, "callmeter: error: webhook 127.0.0.1:{port} unreachable: "),
        (
            "ftp://127.0.0.1/x",
            SECRET,
            "callmeter: error: --webhook must be an http(s)://host[:port]/path URL",
        ),
        (
            "http://127.0.0.1:{port}/x",
            "",
            "callmeter: error: notify signs every alert: set CALLMETER_NOTIFY_SECRET",
        ),
    ],
)
def test_bad_start_is_one_line_and_non_zero(
    notify_env: dict[str, str], url: str, secret: str, message: str
) -> None:
    port = free_port()  # nobody listens there
    env = dict(notify_env, CALLMETER_NOTIFY_SECRET=secret)
    proc = callmeter(env, "notify", "--webhook", url.format(port=port), "--until-idle", check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(message.format(port=port)), proc.stderr
