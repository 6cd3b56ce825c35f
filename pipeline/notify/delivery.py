"""`callmeter notify --webhook URL`: deliver the alerts topic to an HTTP endpoint.

Commit protocol (the offsets of the notifier's own consumer group, never the worker's):
1. Alerts are read read_committed, so only alerts whose worker transaction committed are delivered.
2. One alert at a time, in partition order: POST it, retrying connection errors, timeouts and non-2xx
   answers with capped exponential backoff.
3. After a 2xx, commit the offset after it, synchronously. Everything before it on that partition was
   delivered first (step 2 is sequential), so a committed offset never passes an undelivered alert.
4. An alert the endpoint refuses ``notify_max_attempts`` times stops the notifier with one line and a
   non-zero exit; its offset stays uncommitted, so the next run starts with it. Nothing is skipped.
A crash anywhere re-sends at most the alerts after the last commit: delivery is at least once, and the
``Idempotency-Key`` header (stable across redeliveries, see :func:`idempotency_key`) lets the receiver
make it exactly once.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.errors import InputError, PipelineError
from pipeline.settings import Settings
from schemas.errors import SerdeError
from schemas.serde import Serde

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Callmeter-Signature"
KEY_HEADER = "Idempotency-Key"
# --until-idle: how long to wait for the first partitions (several session timeouts of a killed member).
ASSIGNMENT_WAIT_SECONDS = 60.0


class DeliveryError(PipelineError):
    """The webhook refused an alert for every attempt the settings allow; nothing after it was sent."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    initial_backoff_seconds: float
    max_backoff_seconds: float
    timeout_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.notify_max_attempts,
            settings.notify_initial_backoff_seconds,
            settings.notify_max_backoff_seconds,
            settings.notify_timeout_seconds,
        )


def backoff_seconds(failed_attempts: int, initial_seconds: float, max_seconds: float) -> float:
    """The wait after the ``failed_attempts``-th failure: initial, doubled each time, capped. No jitter:
    one notifier per partition posts one alert at a time, so there is no herd to spread."""
    if failed_attempts < 1:
        msg = f"failed_attempts starts at 1, not {failed_attempts}"
        raise ValueError(msg)
    return float(min(max_seconds, initial_seconds * 2 ** min(failed_attempts - 1, 62)))


def sign(secret: bytes, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of the exact body bytes>``, the value of the signature header."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """What a receiver does with the signature header (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, body), header)


def _identity_suffix(record: dict[str, Any]) -> str:
    """The threshold (usage alerts) or the quota's subject (``numbers``, ``employees``): the last part
    of the worker's deterministic alert_id, ``tenant-YYYYMMDD-kind-suffix``."""
    if record.get("threshold_percent") is not None:
        return str(record["threshold_percent"])
    prefix = f"{record['tenant_id']}-{record['period_start'].strftime('%Y%m%d')}-{record['kind']}-"
    alert_id = str(record["alert_id"])
    return alert_id[len(prefix) :] if alert_id.startswith(prefix) else alert_id


def idempotency_key(record: dict[str, Any]) -> str:
    """SHA-256 (hex) of the alert's identity: tenant, period start, kind and threshold or subject.

    The worker sends each of these once (spec §8), so the identity names one alert. It is not the Kafka
    offset: a fresh cluster reuses offsets, and a rebuilt pipeline that sends an alert again (with a new
    emitted_at) must be recognised as the same alert. Fields are joined with a separator no tenant id
    can contain ambiguously (JSON array), then hashed so the key has a fixed length."""
    identity = [
        str(record["tenant_id"]),
        record["period_start"].isoformat(),
        str(record["kind"]),
        _identity_suffix(record),
    ]
    return hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def alert_body(record: dict[str, Any]) -> bytes:
    """The POST body: the alert's fields as JSON (times RFC 3339 UTC), plus its idempotency key."""
    document = {k: _json_value(v) for k, v in record.items()}
    document["idempotency_key"] = idempotency_key(record)
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = f"--webhook must be an http(s)://host[:port]/path URL, not {url!r}"
            raise InputError(msg)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            msg = f"--webhook {url!r}: {exc}"
            raise InputError(msg) from exc
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port, path)

    def check_reachable(self, timeout_seconds: float) -> None:
        """A TCP connection at start: a mistyped host or port fails now, with one line, not after the
        first alert's retries."""
        try:
            socket.create_connection((self.host, self.port), timeout=timeout_seconds).close()
        except OSError as exc:
            msg = f"webhook {self.host}:{self.port} unreachable: {exc.strerror or exc}"
            raise InputError(msg) from exc


class Webhook:
    def __init__(
        self,
        endpoint: Endpoint,
        secret: bytes,
        policy: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint, self.secret, self.policy, self.sleep = endpoint, secret, policy, sleep
        self.attempts = 0

    def post_once(self, body: bytes, key: str) -> str | None:
        """One POST; None on a 2xx, else why it failed."""
        self.attempts += 1
        ep = self.endpoint
        conn: http.client.HTTPConnection
        if ep.scheme == "https":
            conn = http.client.HTTPSConnection(
                ep.host, ep.port, timeout=self.policy.timeout_seconds, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(ep.host, ep.port, timeout=self.policy.timeout_seconds)
        headers = {
            "Content-Type": "application/json",
            KEY_HEADER: key,
            SIGNATURE_HEADER: sign(self.secret, body),
            "User-Agent": "callmeter-notify",
        }
        try:
            conn.request("POST", ep.path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            conn.close()
        # Redirects are not followed: a 3xx is not a delivery.
        return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"

    def deliver(self, body: bytes, key: str, what: str) -> int:
        """POST until a 2xx; the attempts it took. Raises DeliveryError when every attempt failed."""
        for attempt in range(1, self.policy.max_attempts + 1):
            failure = self.post_once(body, key)
            if failure is None:
                return attempt
            if attempt == self.policy.max_attempts:
                msg = f"webhook refused {what} {self.policy.max_attempts} times (last: {failure})"
                raise DeliveryError(msg)
            wait = backoff_seconds(
                attempt, self.policy.initial_backoff_seconds, self.policy.max_backoff_seconds
            )
            log.warning("webhook: %s attempt %d failed (%s); retrying in %.1fs", what, attempt, failure, wait)
            self.sleep(wait)
        msg = "max_attempts must be at least 1"
        raise InputError(msg)


def prepare_webhook(settings: Settings, url: str) -> Webhook:
    """Everything that can be wrong before the first alert: secret, limits, URL, reachability."""
    if settings.notify_secret is None or not settings.notify_secret.get_secret_value():
        msg = "notify signs every alert: set CALLMETER_NOTIFY_SECRET"
        raise InputError(msg)
    if settings.notify_max_attempts < 1:
        msg = f"notify_max_attempts must be at least 1, not {settings.notify_max_attempts}"
        raise InputError(msg)
    endpoint = Endpoint.parse(url)
    policy = RetryPolicy.from_settings(settings)
    endpoint.check_reachable(policy.timeout_seconds)
    return Webhook(endpoint, settings.notify_secret.get_secret_value().encode(), policy)


def run_notify(
    settings: Settings, bootstrap: str, serde: Serde, webhook: Webhook, until_idle: bool
) -> dict[str, int]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{settings.app_id}-notify",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            # A killed notifier keeps its partitions until its session times out: 6 s (the broker's
            # default minimum), not 45 s, before a restarted one takes over its alerts. Heartbeats run
            # on librdkafka's thread, so a long retry of one alert does not end the session.
            "session.timeout.ms": 6000,
        }
    )
    assigned: list[bool] = []
    quiet_since = time.monotonic()

    def on_assign(_consumer: Consumer, _partitions: list[TopicPartition]) -> None:
        nonlocal quiet_since
        assigned.append(True)
        quiet_since = time.monotonic()

    consumer.subscribe([settings.topics.alerts], on_assign=on_assign)
    delivered = 0
    try:
        # --until-idle: idle time counts from the first assignment (joining a group whose previous
        # member was killed takes up to its session timeout), then from the last delivery.
        while not until_idle or not assigned or time.monotonic() - quiet_since < settings.idle_seconds:
            message = consumer.poll(0.5)
            if until_idle and not assigned and time.monotonic() - quiet_since > ASSIGNMENT_WAIT_SECONDS:
                # A run that must end never hangs: no group, no broker, no alerts topic.
                text = f"no partition of {settings.topics.alerts} assigned in {ASSIGNMENT_WAIT_SECONDS:.0f} s"
                raise PipelineError(text)
            if message is None:
                continue
            err = message.error()
            if err is not None:
                if err.fatal():
                    text = f"alerts consumer: {err.str()}"
                    raise PipelineError(text)
                log.warning("alerts consumer: %s", err.str())
                continue
            topic, partition, offset = str(message.topic()), message.partition() or 0, message.offset() or 0
            where = f"{topic}[{partition}]@{offset}"
            try:
                _name, record = serde.decode(message.value() or b"")
            except SerdeError as exc:
                # Never skipped: an alert nobody can read is still an alert somebody should have had.
                text = f"undecodable alert at {where} ({exc.message}); not committed"
                raise DeliveryError(text) from exc
            what = f"alert {record['alert_id']} at {where}"
            webhook.deliver(alert_body(record), idempotency_key(record), what)
            _commit(consumer, topic, partition, offset + 1)
            delivered += 1
            quiet_since = time.monotonic()
    finally:
        consumer.close()
    return {"delivered": delivered, "attempts": webhook.attempts}


def _commit(consumer: Consumer, topic: str, partition: int, offset: int) -> None:
    try:
        consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
    except KafkaException as exc:
        # A rebalance took the partition meanwhile: its next owner re-sends this alert, which the
        # receiver drops by its idempotency key. Delivered once more, never lost.
        log.warning("alerts consumer: commit of %s[%d]@%d failed: %s", topic, partition, offset, exc)
