"""The worker's tables behind one narrow port, so each part owns its keys and is testable without Kafka.

Every part of the worker (dedupe index, parking lot, balance book, tenant book, live window) reads and
writes its table through ``StateTable``: a key-value map per input partition. In the worker it is a
Faust table (``FaustTable``): RocksDB locally, every write also a changelog record inside the current
input partition's transaction (pipeline/stream/worker.py, protocol step 4). In unit tests it is a
``MemoryTable``. Reads go to the partition's own database: Faust's own lookup outside an event goes
through a key->partition cache that can miss a key on disk after a rebalance.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any, Protocol

import faust

from pipeline.errors import PipelineError


class StateTable(Protocol):
    def get(self, partition: int, key: str) -> Any: ...

    def put(self, partition: int, key: str, value: Any) -> None: ...

    def write_now(self, partition: int, key: str, value: Any) -> None:
        """``put`` outside of any event too (at a commit): the partition is given, not taken from the
        event being handled."""

    def delete(self, partition: int, key: str) -> None: ...

    def put_local(self, partition: int, key: str, value: Any) -> None:
        """The partition's local store only, no changelog record: for state whose changelog record the
        part writes itself, in batches (stream/dedupe.py)."""

    def delete_local(self, partition: int, key: str) -> None:
        """Remove from the partition's local store only, no changelog record."""

    def scan(self, partition: int, prefix: str = "") -> Iterator[tuple[str, Any]]: ...


class MemoryTable:
    """A ``StateTable`` in dicts, for unit tests; ``writes`` counts puts and deletes (what a Faust table
    would send to its changelog), not local writes."""

    def __init__(self) -> None:
        self.partitions: dict[int, dict[str, Any]] = defaultdict(dict)
        self.writes = 0
        # What a Faust table's changelog would hold: (partition, key, value or None for a delete).
        self.changelog: list[tuple[int, str, Any]] = []

    def get(self, partition: int, key: str) -> Any:
        return self.partitions[partition].get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.writes += 1
        self.partitions[partition][key] = value
        self.changelog.append((partition, key, value))

    def write_now(self, partition: int, key: str, value: Any) -> None:
        self.put(partition, key, value)

    def delete(self, partition: int, key: str) -> None:
        if self.partitions[partition].pop(key, None) is not None:
            self.writes += 1
            self.changelog.append((partition, key, None))

    def put_local(self, partition: int, key: str, value: Any) -> None:
        self.partitions[partition][key] = value

    def delete_local(self, partition: int, key: str) -> None:
        self.partitions[partition].pop(key, None)

    def scan(self, partition: int, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for key in sorted(self.partitions[partition]):
            if key.startswith(prefix):
                yield key, self.partitions[partition][key]


class FaustTable:
    """A ``StateTable`` over a Faust table with the RocksDB store. Writes go through the table, so Faust
    sends them to the changelog partition of the event being handled; a write for another partition
    would land in the wrong one, so it is refused."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def _db(self, partition: int) -> Any:
        return self.table.data._db_for_partition(partition)

    def get(self, partition: int, key: str) -> Any:
        store = self.table.data
        raw = self._db(partition).get(store._encode_key(key))
        return None if raw is None else store._decode_value(raw)

    def put(self, partition: int, key: str, value: Any) -> None:
        self._check(partition)
        self.table[key] = value

    def write_now(self, partition: int, key: str, value: Any) -> None:
        """RocksDB of the partition, and the table's changelog partition through Faust's producer buffer:
        the commit that follows drains it into the partition's transaction (guard.py)."""
        store = self.table.data
        self._db(partition).put(store._encode_key(key), store._encode_value(value))
        self.table.send_changelog(partition, key, value)

    def put_local(self, partition: int, key: str, value: Any) -> None:
        store = self.table.data
        self._db(partition).put(store._encode_key(key), store._encode_value(value))

    def delete_local(self, partition: int, key: str) -> None:
        self._db(partition).delete(self.table.data._encode_key(key))

    def delete(self, partition: int, key: str) -> None:
        if self.get(partition, key) is not None:
            self._check(partition)
            del self.table[key]

    def scan(self, partition: int, prefix: str = "") -> Iterator[tuple[str, Any]]:
        store = self.table.data
        # Keys are JSON strings: the encoded prefix without its closing quote starts every match. The
        # store's own bookkeeping keys (persisted offsets) are not JSON strings and never match.
        start = store._encode_key(prefix)[:-1]
        for raw_key, raw_value in self._db(partition).items(from_key=start):
            if not raw_key.startswith(start):
                break
            yield store._decode_key(raw_key), store._decode_value(raw_value)

    @staticmethod
    def _check(partition: int) -> None:
        event = faust.current_event()
        if event is None or event.message.partition != partition:
            where = (
                "outside an event"
                if event is None
                else f"during an event of partition {event.message.partition}"
            )
            msg = f"a table write for partition {partition} {where} would reach the wrong changelog partition"
            raise PipelineError(msg)
