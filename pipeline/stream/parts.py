"""Declarations shared by the Meter and its parts (parking, balances)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipeline.settings import Settings
from pipeline.stream.stats import Stats
from rating.calls import RatedCall
from rating.catalog import Catalog
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

    @staticmethod
    def balance_key(tenant: str, period_start: datetime) -> str:
        return f"{tenant}|{period_start.isoformat()}"
