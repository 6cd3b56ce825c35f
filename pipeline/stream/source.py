"""An input record as the worker receives it, before decoding: the typed form of where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

CALL = "call"
PROVISIONING = "provisioning"


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One record of ``calls`` or ``provisioning``: its position, key, bytes and the time Kafka
    stamped on it (the broker's append time on the topics callmeter creates, pipeline/topics.py)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    kind: str  # CALL or PROVISIONING

    @property
    def received_at(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    @property
    def key_text(self) -> str:
        """The Kafka key (the tenant id, as gateways key their records) as text, for records whose
        value does not decode."""
        return self.key.decode("utf-8", "replace") if self.key is not None else ""

    @classmethod
    def of(cls, message: Any, value: Any, calls_topic: str) -> SourceRecord:
        """From a Faust message (timestamp in seconds) and the event's value."""
        raw = value if isinstance(value, bytes) else bytes(value or b"")
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=raw,
            timestamp_ms=int(message.timestamp * 1000),
            kind=CALL if message.topic == calls_topic else PROVISIONING,
        )
