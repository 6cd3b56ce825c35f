"""The dedupe index (spec §2): which input events were seen, under what key, and what is kept of them.

Keys, in the ``seen`` table of the event's input partition:

- ``call|<tenant>|<event id>`` and ``provisioning|<tenant>|<event id>`` for a decoded event (the key of
  spec §2 with the topic as its kind: a call and a provisioning event may share an id);
- ``raw|<kind>|<digest of the bytes>`` for a record that does not decode or names no tenant or id: a
  copy of the same bytes is the same bad event.

Values (the *facts* kept of an event; their layout is what the changelog and every running worker hold):

- an accepted call: ``[ended ms, started ms, raw connected ms]``: its end is what retention measures,
  its start and raw milliseconds are all a re-rating or an alert's crossing needs;
- an accepted provisioning event: its occurrence time in ms (the tenant's timeline keeps the event
  itself, and is the complete dedupe record of provisioning: ``TenantTimeline.has_event``);
- a refused (dead-lettered) event: ``[event ms, "dead", crc32 of its bytes]``. An identical copy is a
  duplicate; a corrected resend under the same id has other bytes and is processed anew.

A key is forgotten once its event time is before the live window's key floor (pipeline/stream/window.py),
never earlier: every call of a live period is known.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pipeline.stream.state import StateTable
from rating.models import CallEvent

log = logging.getLogger(__name__)

RememberedCall = tuple[datetime, datetime, Decimal]  # started_at, ended_at, raw seconds


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def event_key(kind: str, tenant_id: str, event_id: str) -> str:
    return f"{kind}|{tenant_id}|{event_id}"


def raw_key(kind: str, value: bytes) -> str:
    return f"raw|{kind}|{hashlib.blake2b(value, digest_size=16).hexdigest()}"


def call_fact(call: CallEvent) -> list[int]:
    raw_ms = 0
    if call.disposition == "ANSWERED" and call.answered_at is not None:
        raw_ms = ms(call.ended_at) - ms(call.answered_at)
    return [ms(call.ended_at), ms(call.started_at), raw_ms]


def dead_fact(event_ms: int, value: bytes) -> list[Any]:
    return [event_ms, "dead", zlib.crc32(value)]


def _is_dead(fact: Any) -> bool:
    return isinstance(fact, list) and len(fact) == 3 and fact[1] == "dead"


def _event_ms(fact: Any) -> int | None:
    value = fact[0] if isinstance(fact, list) and fact else fact
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class DedupeIndex:
    def __init__(self, state: StateTable) -> None:
        self.state = state

    def is_copy(self, partition: int, key: str, value: bytes) -> bool:
        """A copy of an event already accepted, or of a refused one with the very same bytes. A refused
        event resent with other bytes (corrected) is not a copy: it is processed anew."""
        known = self.state.get(partition, key)
        if known is None:
            return False
        return not (_is_dead(known) and known[2] != zlib.crc32(value))

    def accept_call(self, partition: int, key: str, call: CallEvent) -> None:
        self.state.put(partition, key, call_fact(call))

    def accept_provisioning(self, partition: int, key: str, occurred_at: datetime) -> None:
        self.state.put(partition, key, ms(occurred_at))

    def refuse(self, partition: int, key: str, event_ms: int, value: bytes) -> None:
        """The event went to the dead-letter topic: remember its bytes so a copy is a duplicate."""
        self.state.put(partition, key, dead_fact(event_ms, value))

    def release(self, partition: int, key: str) -> None:
        """Forget a key whose event was not accepted after all (a parked call that timed out), so a
        resend once the tenant is subscribed is rated."""
        self.state.delete(partition, key)

    def calls_of(self, partition: int, tenant_id: str) -> list[RememberedCall]:
        """Every accepted call of the tenant whose key is held (parked ones included: no subscription
        covers those, so rating them counts nothing)."""
        calls = []
        for _key, fact in self.state.scan(partition, f"call|{tenant_id}|"):
            if isinstance(fact, list) and len(fact) == 3 and isinstance(fact[1], int):
                ended = datetime.fromtimestamp(fact[0] / 1000, UTC)
                started = datetime.fromtimestamp(fact[1] / 1000, UTC)
                calls.append((started, ended, Decimal(fact[2]) / 1000))
        return calls

    def sweep(self, partition: int, floor_ms: int) -> int:
        """Forget the partition's keys whose event time is before ``floor_ms``; the number forgotten."""
        expired = [
            key for key, fact in self.state.scan(partition) if (_event_ms(fact) or floor_ms) < floor_ms
        ]
        for key in expired:
            self.state.delete(partition, key)
        if expired:
            log.info("dedupe retention: forgot %d keys of partition %d", len(expired), partition)
        return len(expired)
