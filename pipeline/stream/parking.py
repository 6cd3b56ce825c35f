"""The parking lot: calls no subscription covers yet (docs/decisions.md, "Parking and calls no
subscription covers"), in the ``parked`` table under the tenant id, in arrival order.

A parked call waits for the tenant's SUBSCRIPTION_STARTED (events on the two topics are not ordered).
A *revivable* one was dead-lettered NO_SUBSCRIPTION at once (the tenant is subscribed, but nothing
covered the call's period), and is kept only so that later provisioning can still cover it. Both leave
at the parking timeout (wall clock since parking). The worker decides what happens to a call that
leaves (pipeline/stream/worker.py); this part only keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.stream.source import CALL, SourceRecord
from pipeline.stream.state import StateTable


@dataclass(frozen=True, slots=True)
class ParkedCall:
    source: SourceRecord
    parked_at_ms: int
    revivable: bool


def _to_item(call: ParkedCall) -> dict[str, Any]:
    src = call.source
    item: dict[str, Any] = {
        "t": src.topic,
        "p": src.partition,
        "o": src.offset,
        "v": src.value.hex(),
        "at": call.parked_at_ms,
        "ts": src.timestamp_ms,
    }
    if call.revivable:
        item["d"] = 1
    return item


def _from_item(tenant_id: str, item: dict[str, Any]) -> ParkedCall:
    source = SourceRecord(
        topic=item["t"],
        partition=int(item["p"]),
        offset=int(item["o"]),
        key=tenant_id.encode(),
        value=bytes.fromhex(item["v"]),
        timestamp_ms=int(item.get("ts", item["at"])),
        kind=CALL,
    )
    return ParkedCall(source, int(item["at"]), bool(item.get("d")))


class ParkingLot:
    def __init__(self, state: StateTable) -> None:
        self.state = state

    def park(self, tenant_id: str, call: ParkedCall) -> None:
        partition = call.source.partition
        held = list(self.state.get(partition, tenant_id) or [])
        held.append(_to_item(call))
        self.state.put(partition, tenant_id, held)

    def take(self, partition: int, tenant_id: str) -> list[ParkedCall]:
        """Every call parked for the tenant, removed from the lot (the caller parks again what stays)."""
        held = self.state.get(partition, tenant_id)
        if not held:
            return []
        self.state.delete(partition, tenant_id)
        return [_from_item(tenant_id, item) for item in held]

    def expire(self, partition: int, parked_before_ms: int) -> list[tuple[str, ParkedCall]]:
        """Remove and return ``(tenant, call)`` for every call of the partition parked before the cutoff."""
        expired = []
        for tenant_id, held in list(self.state.scan(partition)):
            if not isinstance(held, list):
                continue
            keep = [item for item in held if item["at"] >= parked_before_ms]
            if len(keep) == len(held):
                continue
            expired += [(tenant_id, _from_item(tenant_id, i)) for i in held if i["at"] < parked_before_ms]
            if keep:
                self.state.put(partition, tenant_id, keep)
            else:
                self.state.delete(partition, tenant_id)
        return expired
