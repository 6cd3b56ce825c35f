"""Dedupe keys reach the changelog in batches, one record per partition per commit (stream/dedupe.py), and
a rebuild from the changelog knows exactly the keys the worker knew: copies stay copies, released keys
stay released, keys past retention go with their batch."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from pipeline.stream.dedupe import (
    KEY_BATCH_PREFIX,
    KEYS_PER_BATCH,
    DedupeIndex,
    event_key,
    expand_key_batches,
    ms,
)
from pipeline.stream.state import MemoryTable
from tests.unit.meterkit import MemoryWorker, at, call, subscribe

NOV = "2026-11-01T00:00:00Z"


class _JsonStore:
    """Faust's RocksDB store as expand_key_batches sees it: JSON keys and values, a dict per partition."""

    def __init__(self) -> None:
        self.dbs: dict[int, dict[bytes, bytes]] = {}

    @staticmethod
    def _encode_key(key: str) -> bytes:
        return json.dumps(key).encode()

    @staticmethod
    def _encode_value(value: Any) -> bytes:
        return json.dumps(value).encode()

    @staticmethod
    def _decode_value(raw: bytes) -> Any:
        return json.loads(raw)

    def _db_for_partition(self, partition: int) -> Any:
        db = self.dbs.setdefault(partition, {})
        return SimpleNamespace(put=db.__setitem__)

    def apply(self, changelog: list[tuple[int, str, Any]]) -> None:
        """Faust's apply_changelog_batch (every record as it is), then the expansion."""
        records = []
        for partition, key, value in changelog:
            raw_key = self._encode_key(key)
            raw_value = None if value is None else self._encode_value(value)
            db = self.dbs.setdefault(partition, {})
            if raw_value is None:
                db.pop(raw_key, None)
            else:
                db[raw_key] = raw_value
            records.append(
                SimpleNamespace(message=SimpleNamespace(partition=partition, key=raw_key, value=raw_value))
            )
        expand_key_batches(self, records)

    def table(self) -> MemoryTable:
        rebuilt = MemoryTable()
        for partition, db in self.dbs.items():
            for raw_key, raw_value in db.items():
                rebuilt.partitions[partition][json.loads(raw_key)] = json.loads(raw_value)
        return rebuilt


def _rebuilt(table: MemoryTable) -> MemoryTable:
    store = _JsonStore()
    store.apply(table.changelog)
    return store.table()


def _state_lost(w: MemoryWorker) -> MemoryWorker:
    """The worker's local state deleted and rebuilt from the changelogs (after an unclean stop)."""
    return MemoryWorker(
        retention_days=w.settings.dedupe_retention_days,
        now=w.now,
        rating_catalog=w.catalog,
        tables={name: _rebuilt(table) for name, table in w.tables.items()},
    )


def test_keys_are_written_at_the_commit_one_record_per_partition() -> None:
    seen = MemoryTable()
    index = DedupeIndex(seen)
    for n in range(5):
        index.accept_call(n % 2, event_key("call", "t1", f"c{n}"), _call_event(f"c{n}"))
    assert seen.writes == 0  # held locally, not yet in the changelog
    assert index.is_copy(0, event_key("call", "t1", "c0"), b"")
    assert index.flush() == 2
    assert sorted(p for p, _key, _value in seen.changelog) == [0, 1]
    assert all(key.startswith(KEY_BATCH_PREFIX) for _p, key, _value in seen.changelog)
    assert index.flush() == 0  # nothing new


def test_a_large_commit_is_split_into_records_of_at_most_the_batch_size() -> None:
    seen = MemoryTable()
    index = DedupeIndex(seen)
    for n in range(2 * KEYS_PER_BATCH + 1):
        index.accept_call(0, event_key("call", "t1", f"c{n}"), _call_event(f"c{n}"))
    assert index.flush() == 3
    assert sorted(len(value) for _p, _key, value in seen.changelog) == [1, KEYS_PER_BATCH, KEYS_PER_BATCH]


def test_after_state_loss_every_copy_is_still_a_duplicate() -> None:
    w = MemoryWorker()
    w.feed(subscribe(), call("a", "2026-11-02T10:00:00Z", 60), call("b", "2026-11-03T10:00:00Z", 30))
    assert w.tables["seen"].writes == 1  # both keys in one batch record
    again = _state_lost(w)
    again.feed(call("a", "2026-11-02T10:00:00Z", 60), call("b", "2026-11-03T10:00:00Z", 30))
    assert (again.stats.rated, again.stats.duplicates) == (0, {"call": 2})
    assert again.used(NOV) == 90


def test_keys_not_yet_committed_are_not_in_a_rebuild() -> None:
    """A crash before the commit: the events come again and are new, as their outputs were aborted."""
    w = MemoryWorker()
    w.feed(subscribe())
    index = w.parts.dedupe
    index.accept_call(0, event_key("call", "t1", "x"), _call_event("x"))  # handled, not committed
    again = _state_lost(w)
    assert not again.parts.dedupe.is_copy(0, event_key("call", "t1", "x"), b"")


def test_a_released_key_stays_released_after_a_rebuild() -> None:
    seen = MemoryTable()
    index = DedupeIndex(seen)
    key = event_key("call", "t1", "parked")
    index.accept_call(0, key, _call_event("parked"))
    index.flush()
    index.release(0, key)
    index.flush()
    assert not index.is_copy(0, key, b"")
    assert not DedupeIndex(_rebuilt(seen)).is_copy(0, key, b"")
    assert DedupeIndex(_rebuilt(seen)).calls_of(0, "t1") == []


def test_retention_forgets_keys_locally_and_deletes_batches_wholly_past_the_floor() -> None:
    seen = MemoryTable()
    index = DedupeIndex(seen)
    old, new = event_key("call", "t1", "old"), event_key("call", "t1", "new")
    index.accept_call(0, old, _call_event("old", "2026-09-01T10:00:00Z"))
    index.flush()
    index.accept_call(0, new, _call_event("new", "2026-11-20T10:00:00Z"))
    index.flush()
    floor = ms(at("2026-10-01T00:00:00Z"))
    assert index.sweep(0, floor) == 1
    assert not index.is_copy(0, old, b"")
    assert index.is_copy(0, new, b"")
    batches = [key for key in seen.partitions[0] if key.startswith(KEY_BATCH_PREFIX)]
    assert len(batches) == 1  # the old key's batch record is deleted, through the changelog
    # The deleted batch record is still in the log until compaction: the rebuild brings the old key back,
    # and the key floor keeps it forgotten.
    rebuilt = DedupeIndex(_rebuilt(seen), lambda _p: floor)
    assert not rebuilt.is_copy(0, old, b"")
    assert rebuilt.is_copy(0, new, b"")
    compacted = [(p, k, v) for p, k, v in seen.changelog if k in seen.partitions[p]]
    seen.changelog = compacted
    assert not DedupeIndex(_rebuilt(seen)).is_copy(0, old, b"")


def _call_event(event_id: str, answered: str = "2026-11-02T10:00:00Z") -> Any:
    from pipeline.records import call_from_record
    from schemas.json_events import parse_json_event

    return call_from_record(parse_json_event(call(event_id, answered, 30))[1])
