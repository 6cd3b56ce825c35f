"""Declarations shared by the Meter and its parts (parking, balances), and what the threads and the
web handlers beside it read (watch, web): they type against this, not the Meter, so that the worker
can import them without an import cycle."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from pipeline.settings import Settings
from pipeline.stream.stats import Stats
from pipeline.tenantapi.answers import balance_key
from rating.calls import RatedCall
from rating.catalog import Catalog
from rating.subscription import TenantTimeline
from schemas.serde import Serde


class MeterParts:
    """What the Meter's parts need of it, declared for readers and type checkers
    (pipeline/stream/worker.py)."""

    app: Any  # the faust.App
    settings: Settings
    topics: Any
    _parking_swept: dict[int, int]
    catalog: Catalog
    serde: Serde
    stats: Stats
    seen: Any
    parked: Any
    balances: Any
    alerted: Any
    tenants: Any
    # Read by watch and web.
    ready: threading.Event
    lag: dict[tuple[str, int], int]
    _timelines: dict[str, TenantTimeline]
    _balance_cache: dict[str, int]

    async def _dead(self, src: tuple[Any, ...], reason: str, message: str) -> None:
        raise NotImplementedError

    async def _send(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        raise NotImplementedError

    async def _emit_rated(self, src: tuple[Any, ...], rated: RatedCall) -> None:
        raise NotImplementedError

    def partition_of(self, tenant_id: str) -> int:
        raise NotImplementedError

    def read_owned(self, table: Any, key: str, tenant_id: str | None = None) -> Any:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def balance_key(tenant: str, period_start: datetime) -> str:
        return balance_key(tenant, period_start)
