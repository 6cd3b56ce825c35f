"""An in-memory stream worker for the Meter's unit tests (no tests here): the real Meter and parts over
``MemoryTable``s, outputs collected instead of sent, and builders of encoded input records."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.settings import Settings
from pipeline.stream.balances import BalanceBook
from pipeline.stream.dedupe import DedupeIndex
from pipeline.stream.emitter import Emitter
from pipeline.stream.parking import ParkingLot
from pipeline.stream.source import CALL, PROVISIONING, SourceRecord
from pipeline.stream.state import MemoryTable
from pipeline.stream.stats import Stats
from pipeline.stream.tenants import TenantBook
from pipeline.stream.window import LiveWindow
from pipeline.stream.worker import Meter, Parts
from rating.catalog import Catalog
from schemas.json_events import parse_json_event
from schemas.serde import Serde
from tests.unit.test_rating_support import catalog

SERDE = Serde()
NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def call(event_id: str, answered: str, seconds: float, tenant: str = "t1", **over: Any) -> dict[str, Any]:
    """An ANSWERED call that rang a second and lasted ``seconds`` after it was answered."""
    answered_at = at(answered)
    event = {
        "type": "call",
        "event_id": event_id,
        "tenant_id": tenant,
        "call_id": f"c-{event_id}",
        "employee_id": None,
        "direction": "INBOUND",
        "from_number": "+15550000001",
        "to_number": "+15551110001",
        "started_at": iso(answered_at - timedelta(seconds=1)),
        "answered_at": iso(answered_at),
        "ended_at": iso(answered_at + timedelta(seconds=seconds)),
        "disposition": "ANSWERED",
        "gateway_id": "gw-1",
    }
    event.update(over)
    return event


def prov(event_id: str, occurred: str, action: str, tenant: str = "t1", **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "provisioning",
        "event_id": event_id,
        "tenant_id": tenant,
        "occurred_at": occurred,
        "action": action,
        "plan_id": None,
        "tax_region": None,
        "number": None,
        "number_type": None,
        "employee_id": None,
    }
    event.update(extra)
    return event


def subscribe(
    occurred: str = "2026-11-01T00:00:00Z", plan: str = "starter", tenant: str = "t1"
) -> dict[str, Any]:
    return prov(f"sub-{tenant}", occurred, "SUBSCRIPTION_STARTED", tenant, plan_id=plan, tax_region="NONE")


class MemoryWorker:
    """The Meter over in-memory tables. ``tables`` may be shared with an earlier worker: a restart with
    the state the changelogs would give back."""

    def __init__(
        self,
        retention_days: int = 40,
        now: datetime = NOW,
        rating_catalog: Catalog | None = None,
        tables: dict[str, MemoryTable] | None = None,
        **settings: Any,
    ) -> None:
        self.now = now
        self.settings = Settings(
            topic_prefix="", partitions=1, dedupe_retention_days=retention_days, **settings
        )
        self.tables = tables or {
            name: MemoryTable() for name in ("seen", "tenants", "parked", "balances", "alerted")
        }
        self.catalog = rating_catalog or catalog()
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        window = LiveWindow(self.tables["balances"], retention_days, clock=lambda: self.now.timestamp())
        dedupe = DedupeIndex(self.tables["seen"], window.key_floor_ms)

        async def send(topic: str, key: bytes | None, value: bytes, headers: Any) -> None:
            self.sent.append((topic, key, value))

        self.parts = Parts(
            dedupe=dedupe,
            tenants=TenantBook(self.tables["tenants"]),
            parking=ParkingLot(self.tables["parked"]),
            window=window,
            book=BalanceBook(
                self.tables["balances"], self.tables["alerted"], self.catalog, window, dedupe.calls_of
            ),
            emit=Emitter(SERDE, self.settings.topics, send),
        )
        self.stats = Stats()
        self.meter = Meter(self.settings, self.catalog, SERDE, self.parts, self.stats)
        self._offsets = itertools.count()

    def record(
        self, event: dict[str, Any] | bytes, kind: str | None = None, received: datetime | None = None
    ) -> SourceRecord:
        if isinstance(event, bytes):
            value, kind = event, kind or CALL
        else:
            name, record = parse_json_event(event)
            kind = CALL if event["type"] == "call" else PROVISIONING
            value = SERDE.encode(name, record, kind)
        topic = "calls" if kind == CALL else "provisioning"
        tenant = event["tenant_id"] if isinstance(event, dict) else "t1"
        stamp = received or self.now
        return SourceRecord(
            topic, 0, next(self._offsets), tenant.encode(), value, int(stamp.timestamp() * 1000), kind
        )

    def feed(self, *events: dict[str, Any] | bytes | SourceRecord) -> None:
        async def run() -> None:
            for event in events:
                src = event if isinstance(event, SourceRecord) else self.record(event)
                await self.meter.handle(src)

        asyncio.run(run())
        self.parts.flush()  # the commit after the events (protocol step 6)

    def outputs(self, topic: str) -> list[dict[str, Any]]:
        return [SERDE.decode(value)[1] for t, _key, value in self.sent if t == topic]

    def used(self, period_start: str, tenant: str = "t1") -> int:
        return self.parts.book.used(0, tenant, at(period_start))

    def restart(self, **kwargs: Any) -> MemoryWorker:
        """A new worker on the state the changelogs hold (nothing in memory survives)."""
        return MemoryWorker(
            retention_days=self.settings.dedupe_retention_days,
            now=kwargs.pop("now", self.now),
            rating_catalog=kwargs.pop("rating_catalog", self.catalog),
            tables=self.tables,
            **kwargs,
        )
