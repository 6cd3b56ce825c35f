"""The tenant book: each tenant's provisioning timeline (``tenants`` table), parsed once and cached.

Only the worker that owns a tenant's partition writes its timeline, so the cache is exact while the
partition stays assigned; every rebalance clears it (``forget``). Parsing the stored JSON on every call
was about 12 % of the event loop.
"""

from __future__ import annotations

from pipeline.stream.state import StateTable
from rating.subscription import TenantTimeline


class TenantBook:
    def __init__(self, state: StateTable) -> None:
        self.state = state
        self._cache: dict[str, TenantTimeline] = {}

    def forget(self) -> None:
        self._cache.clear()

    def get(self, partition: int, tenant_id: str) -> TenantTimeline | None:
        cached = self._cache.get(tenant_id)
        if cached is not None:
            return cached
        stored = self.state.get(partition, tenant_id)
        if not stored:
            return None
        timeline = self._cache[tenant_id] = TenantTimeline.from_dict(stored)
        return timeline

    def put(self, partition: int, timeline: TenantTimeline) -> None:
        self.state.put(partition, timeline.tenant_id, timeline.to_dict())
        self._cache[timeline.tenant_id] = timeline
