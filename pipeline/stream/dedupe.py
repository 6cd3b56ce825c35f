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
  duplicate; a corrected resend under the same id has other bytes and is processed anew;
- a released key (a parked call that timed out): ``[event ms, "released"]``: not held, a resend is new.

Keys are written to the partition's local store (RocksDB) at once, and to the changelog in batches: at
each commit (protocol step 6) one record per partition and up to ``KEYS_PER_BATCH`` keys,
``~keys|<latest event ms>|<ns>|<i>`` -> ``{key: fact, ...}``, inside the partition's transaction. A
recovery from the changelog writes every key of a batch record as it applies it
(``expand_key_batches``, run by Faust's store: stream/faust_seams.py ``MeterStore``), so the local store
holds exactly the committed keys again. A per-key changelog record cost a Faust send per call (about
200 µs); a batch is one send per commit. Keys are never deleted through the changelog: a released key
is a fact of its own, and a batch record is deleted once every key in it is past retention.

A key is forgotten once its event time is before the live window's key floor (pipeline/stream/window.py),
never earlier: every call of a live period is known. A fact before the floor counts as forgotten even
while it is still stored: a rebuild brings a forgotten key back with its batch record until every key
of that batch is past the floor (or compaction has removed a deleted batch record).
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
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


def _is_released(fact: Any) -> bool:
    return isinstance(fact, list) and len(fact) == 2 and fact[1] == "released"


KEY_BATCH_PREFIX = "~keys|"
KEYS_PER_BATCH = 1000  # about 60 KB a record, well under Kafka's 1 MB message limit


def _batch_key(latest_ms: int, chunk: int) -> str:
    # Ordered by the latest event time in the batch, so the retention sweep stops at the first live one.
    return f"{KEY_BATCH_PREFIX}{max(latest_ms, 0):015d}|{time.time_ns()}|{chunk}"


def _batch_latest_ms(batch_key: str) -> int:
    return int(batch_key[len(KEY_BATCH_PREFIX) :].split("|", 1)[0])


def expand_key_batches(store: Any, records: list[Any]) -> None:
    """Recovery: write every key of each batch record among the changelog ``records`` (Faust events)
    just applied by Faust's RocksDB ``store``, in their order."""
    prefix = store._encode_key(KEY_BATCH_PREFIX)[:-1]  # a JSON string without its closing quote
    for record in records:
        message = record.message
        if message.value is None or not isinstance(message.key, bytes) or not message.key.startswith(prefix):
            continue
        db = store._db_for_partition(message.partition)
        for key, fact in store._decode_value(message.value).items():
            db.put(store._encode_key(key), store._encode_value(fact))


def _event_ms(fact: Any) -> int | None:
    value = fact[0] if isinstance(fact, list) and fact else fact
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class DedupeIndex:
    def __init__(self, state: StateTable, floor_ms: Callable[[int], int | None] = lambda _p: None) -> None:
        self.state = state
        # The partition's key floor (stream/window.py): a fact of an earlier event is not held, whether
        # or not a sweep has removed it yet (a rebuild brings keys back with their batch record).
        self.floor_ms = floor_ms
        # Keys written since the last flush, per partition, for the next batch records.
        self._pending: dict[int, dict[str, Any]] = defaultdict(dict)

    def _expired(self, partition: int, fact: Any) -> bool:
        floor = self.floor_ms(partition)
        event_ms = _event_ms(fact)
        return floor is not None and event_ms is not None and event_ms < floor

    def _put(self, partition: int, key: str, fact: Any) -> None:
        self.state.put_local(partition, key, fact)
        self._pending[partition][key] = fact

    def flush(self) -> int:
        """Protocol step 6: the keys written since the last flush as batch records into each partition's
        changelog (at a commit, before it); the number of records written."""
        records = 0
        for partition, pending in self._pending.items():
            items = list(pending.items())
            for chunk, start in enumerate(range(0, len(items), KEYS_PER_BATCH)):
                batch = dict(items[start : start + KEYS_PER_BATCH])
                latest = max((_event_ms(fact) or 0) for fact in batch.values())
                self.state.write_now(partition, _batch_key(latest, chunk), batch)
                records += 1
        self._pending.clear()
        return records

    def is_copy(self, partition: int, key: str, value: bytes) -> bool:
        """A copy of an event already accepted, or of a refused one with the very same bytes. A refused
        event resent with other bytes (corrected) is not a copy: it is processed anew."""
        known = self.state.get(partition, key)
        if known is None or _is_released(known) or self._expired(partition, known):
            return False
        return not (_is_dead(known) and known[2] != zlib.crc32(value))

    def accept_call(self, partition: int, key: str, call: CallEvent) -> None:
        self._put(partition, key, call_fact(call))

    def accept_provisioning(self, partition: int, key: str, occurred_at: datetime) -> None:
        self._put(partition, key, ms(occurred_at))

    def refuse(self, partition: int, key: str, event_ms: int, value: bytes) -> None:
        """The event went to the dead-letter topic: remember its bytes so a copy is a duplicate."""
        self._put(partition, key, dead_fact(event_ms, value))

    def release(self, partition: int, key: str) -> None:
        """Forget a key whose event was not accepted after all (a parked call that timed out), so a
        resend once the tenant is subscribed is rated."""
        fact = self.state.get(partition, key)
        if fact is not None:
            self._put(partition, key, [_event_ms(fact) or 0, "released"])

    def calls_of(self, partition: int, tenant_id: str) -> list[RememberedCall]:
        """Every accepted call of the tenant whose key is held (parked ones included: no subscription
        covers those, so rating them counts nothing)."""
        calls = []
        for _key, fact in self.state.scan(partition, f"call|{tenant_id}|"):
            if (
                isinstance(fact, list)
                and len(fact) == 3
                and isinstance(fact[1], int)
                and not self._expired(partition, fact)
            ):
                ended = datetime.fromtimestamp(fact[0] / 1000, UTC)
                started = datetime.fromtimestamp(fact[1] / 1000, UTC)
                calls.append((started, ended, Decimal(fact[2]) / 1000))
        return calls

    def sweep(self, partition: int, floor_ms: int) -> int:
        """Forget the partition's keys whose event time is before ``floor_ms`` (locally: the changelog
        holds them in batches), and delete the batch records whose every key is; the keys forgotten."""
        expired = []
        for key, fact in self.state.scan(partition):
            if key.startswith(KEY_BATCH_PREFIX):
                continue
            event_ms = _event_ms(fact)
            if event_ms is not None and event_ms < floor_ms:
                expired.append(key)
        for key in expired:
            self.state.delete_local(partition, key)
            self._pending[partition].pop(key, None)
        batches = []
        for key, _batch in self.state.scan(partition, KEY_BATCH_PREFIX):
            if _batch_latest_ms(key) >= floor_ms:
                break  # ordered by their latest event time
            batches.append(key)
        for key in batches:
            self.state.delete(partition, key)
        if expired or batches:
            log.info(
                "dedupe retention: forgot %d keys (%d batch records) of partition %d",
                len(expired),
                len(batches),
                partition,
            )
        return len(expired)
