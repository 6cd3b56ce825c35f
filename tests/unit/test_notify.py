"""Webhook delivery's pure parts: backoff, signing, idempotency keys, retries
(pipeline/notify/delivery.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, date, datetime
from typing import Any

import pytest

from pipeline.errors import InputError
from pipeline.notify.delivery import (
    DeliveryError,
    Endpoint,
    RetryPolicy,
    Webhook,
    alert_body,
    backoff_seconds,
    idempotency_key,
    sign,
    verify,
)


@pytest.mark.parametrize(
    ("failed_attempts", "initial", "cap", "expected"),
    [
        (1, 0.5, 30.0, 0.5),
        (2, 0.5, 30.0, 1.0),
        (3, 0.5, 30.0, 2.0),
        (6, 0.5, 30.0, 16.0),
        (7, 0.5, 30.0, 30.0),
        (8, 0.5, 30.0, 30.0),
        (500, 0.5, 30.0, 30.0),  # no overflow for a very patient operator
        (1, 2.0, 1.0, 1.0),  # the cap wins over the initial wait
    ],
)
def test_backoff_doubles_and_is_capped(
    failed_attempts: int, initial: float, cap: float, expected: float
) -> None:
    assert backoff_seconds(failed_attempts, initial, cap) == expected


def test_backoff_counts_from_the_first_failure() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        backoff_seconds(0, 0.5, 30.0)


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"alert_id":"a"}'
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign(b"s3cret", body) == expected
    assert verify(b"s3cret", body, expected)
    assert not verify(b"s3cret", body + b" ", expected)  # one byte more: another body
    assert not verify(b"other", body, expected)


def alert(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "alert_id": "tau-20261101-USAGE_THRESHOLD-75",
        "tenant_id": "tau",
        "kind": "USAGE_THRESHOLD",
        "period_start": datetime(2026, 11, 1, tzinfo=UTC),
        "threshold_percent": 75,
        "used_seconds": 13500,
        "included_seconds": 18000,
        "message": "tau used 13500 of 18000",
        "emitted_at": datetime(2026, 11, 2, 12, 45, 1, 5000, tzinfo=UTC),
        "crossed_at": datetime(2026, 11, 2, 12, 45, tzinfo=UTC),
        "resource": "call_seconds",
        "usage": 13500,
        "allowance": 18000,
        "projected_exhaustion_date": date(2026, 11, 3),
    }
    record.update(changes)
    return record


def test_idempotency_key_is_the_alerts_identity_not_when_it_was_sent() -> None:
    key = idempotency_key(alert())
    identity = json.dumps(
        ["tau", "2026-11-01T00:00:00+00:00", "USAGE_THRESHOLD", "75"], separators=(",", ":")
    )
    assert key == hashlib.sha256(identity.encode()).hexdigest()
    # Sent again by a rebuilt pipeline: another emitted_at, the same alert.
    assert idempotency_key(alert(emitted_at=datetime(2026, 12, 1, tzinfo=UTC), used_seconds=13600)) == key
    others = [
        alert(threshold_percent=90),
        alert(tenant_id="tau2"),
        alert(period_start=datetime(2026, 12, 1, tzinfo=UTC)),
    ]
    assert len({key, *(idempotency_key(a) for a in others)}) == 4


def test_quota_alerts_are_told_apart_by_subject() -> None:
    def quota(subject: str) -> dict[str, Any]:
        return alert(
            alert_id=f"qq-20261101-QUOTA_EXCEEDED-{subject}",
            tenant_id="qq",
            kind="QUOTA_EXCEEDED",
            threshold_percent=None,
        )

    identity = json.dumps(
        ["qq", "2026-11-01T00:00:00+00:00", "QUOTA_EXCEEDED", "numbers"], separators=(",", ":")
    )
    assert idempotency_key(quota("numbers")) == hashlib.sha256(identity.encode()).hexdigest()
    assert idempotency_key(quota("numbers")) != idempotency_key(quota("employees"))


def test_body_is_the_alert_as_json_with_its_key() -> None:
    body = json.loads(alert_body(alert()))
    assert body == {
        "alert_id": "tau-20261101-USAGE_THRESHOLD-75",
        "tenant_id": "tau",
        "kind": "USAGE_THRESHOLD",
        "period_start": "2026-11-01T00:00:00.000Z",
        "threshold_percent": 75,
        "used_seconds": 13500,
        "included_seconds": 18000,
        "message": "tau used 13500 of 18000",
        "emitted_at": "2026-11-02T12:45:01.005Z",
        "crossed_at": "2026-11-02T12:45:00.000Z",
        "resource": "call_seconds",
        "usage": 13500,
        "allowance": 18000,
        "projected_exhaustion_date": "2026-11-03",
        "idempotency_key": idempotency_key(alert()),
    }


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8080/hook", Endpoint("http", "127.0.0.1", 8080, "/hook")),
        ("https://hooks.example.com", Endpoint("https", "hooks.example.com", 443, "/")),
        ("http://h/a?b=c", Endpoint("http", "h", 80, "/a?b=c")),
    ],
)
def test_endpoint_parse(url: str, expected: Endpoint) -> None:
    assert Endpoint.parse(url) == expected


@pytest.mark.parametrize("url", ["ftp://h/x", "localhost:8080", "http:///x", "http://h:99999/x"])
def test_endpoint_parse_refuses(url: str) -> None:
    with pytest.raises(InputError):
        Endpoint.parse(url)


class ScriptedWebhook(Webhook):
    """post_once answers from a script instead of the network."""

    def __init__(self, answers: list[str | None], max_attempts: int) -> None:
        self.sleeps: list[float] = []
        super().__init__(
            Endpoint("http", "h", 80, "/"), b"k", RetryPolicy(max_attempts, 0.5, 2.0, 1.0), self.sleeps.append
        )
        self.answers = answers

    def post_once(self, body: bytes, key: str) -> str | None:
        self.attempts += 1
        return self.answers.pop(0)


def test_deliver_retries_with_backoff_until_a_2xx() -> None:
    hook = ScriptedWebhook(["HTTP 500", "ConnectionResetError", "TimeoutError", "HTTP 503", None], 10)
    assert hook.deliver(b"{}", "k", "alert a") == 5
    assert hook.sleeps == [0.5, 1.0, 2.0, 2.0]


def test_deliver_gives_up_after_max_attempts_naming_the_alert_and_last_failure() -> None:
    hook = ScriptedWebhook(["HTTP 500", "HTTP 500", "HTTP 502"], 3)
    with pytest.raises(DeliveryError) as exc:
        hook.deliver(b"{}", "k", "alert a at alerts[0]@7")
    assert str(exc.value) == "webhook refused alert a at alerts[0]@7 3 times (last: HTTP 502)"
    assert hook.sleeps == [0.5, 1.0]  # no wait after the last attempt
