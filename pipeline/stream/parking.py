"""Calls no subscription covers yet: parked until provisioning covers them or the timeout passes,
and dead-lettered-but-revivable calls (docs/decisions.md, "Parking and calls no subscription covers").
All of it runs inside the current input partition's transaction."""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline import metrics
from pipeline.records import call_from_record
from pipeline.stream.parts import MeterParts
from rating.calls import rate_call
from rating.models import Reason, Rejection
from rating.subscription import TenantTimeline


class Parking(MeterParts):
    async def _maybe_expire_parked(self, partition: int) -> None:
        minute = int(time.time() // 60)
        if self._parking_swept.get(partition) == minute:
            return
        self._parking_swept[partition] = minute
        await self.expire_parked(
            partition, int(time.time() * 1000) - self.settings.parking_timeout_seconds * 1000
        )

    async def expire_parked(self, partition: int, parked_before_ms: int) -> int:
        """Dead-letter (NO_SUBSCRIPTION) the parked calls of this partition parked before the cutoff.

        Runs inside the current event's transaction, which is this partition's: the dead letters and
        the removal from ``parked`` commit together. Nothing is dropped silently (spec §5)."""
        db_for = getattr(self.parked.data, "_db_for_partition", None)
        if db_for is None:
            return 0
        expired = 0
        for raw_key, raw_value in list(db_for(partition).items()):
            try:
                tenant, held = json.loads(raw_key), json.loads(raw_value)
            except (ValueError, TypeError):
                continue
            if not isinstance(tenant, str) or not isinstance(held, list):
                continue
            keep = [item for item in held if item["at"] >= parked_before_ms]
            for item in held:
                if item["at"] < parked_before_ms:
                    src = (item["t"], item["p"], item["o"], tenant.encode(), bytes.fromhex(item["v"]))
                    message = (
                        f"no SUBSCRIPTION_STARTED for tenant {tenant!r} within the parking timeout "
                        f"({self.settings.parking_timeout_seconds} s)"
                    )
                    if not item.get("d"):  # a revivable call was dead-lettered when it was refused
                        await self._dead(src, Reason.NO_SUBSCRIPTION, message)
                        metrics.PARKED_CALLS.dec()
                    # Not accepted after all: release its idempotency key so a resend after the
                    # subscription exists is rated.
                    _name, record = self.serde.decode(src[4])
                    self.seen.pop(f"call|{tenant}|{record['event_id']}", None)
                    expired += 1
            if len(keep) != len(held):
                if keep:
                    self.parked[tenant] = keep
                else:
                    del self.parked[tenant]
        return expired

    async def _dead_but_revivable(self, src: tuple[Any, ...], call: Any, rejection: Rejection) -> None:
        """The tenant is subscribed but nothing covers the call's period: dead-letter it now (on-call
        sees it, the counts add up), yet keep it among the parked calls marked ``d`` until the parking
        timeout. Provisioning still to come (a re-subscription, an earlier start that moves the anchor)
        can cover it after all; then it is rated (revived), as the batch computation over all events
        would rate it (docs/decisions.md, "Order of events")."""
        await self._dead(src, rejection.reason, rejection.message)
        self._park(src, call.tenant_id, revivable=True)

    def _park(
        self, src: tuple[Any, ...], tenant: str, parked_at_ms: int | None = None, revivable: bool = False
    ) -> None:
        topic, partition, offset, _key, raw = src
        held = list(self.parked.get(tenant) or [])
        at = parked_at_ms if parked_at_ms is not None else int(time.time() * 1000)
        item = {"t": topic, "p": partition, "o": offset, "v": raw.hex(), "at": at}
        if revivable:
            item["d"] = 1  # already dead-lettered; kept only to be revived
        held.append(item)
        self.parked[tenant] = held
        if parked_at_ms is None and not revivable:
            self.stats.parked += 1
            metrics.PARKED_CALLS.inc()

    async def _release_parked(
        self, tenant: str, held: list[dict[str, Any]], timeline: TenantTimeline
    ) -> None:
        """Rate, in arrival order, the parked calls the tenant's timeline now covers. A call it does not
        cover is dead-lettered (once) and kept as revivable with its original parking time."""
        del self.parked[tenant]
        for item in held:
            raw = bytes.fromhex(item["v"])
            src = (item["t"], item["p"], item["o"], tenant.encode(), raw)
            _name, record = self.serde.decode(raw)  # it decoded when it was parked
            call = call_from_record(record)
            result = rate_call(call, timeline, self.catalog)
            already_dead = bool(item.get("d"))
            if isinstance(result, Rejection) and result.reason == Reason.NO_SUBSCRIPTION:
                if not already_dead:
                    await self._dead(src, result.reason, result.message)
                    metrics.PARKED_CALLS.dec()
                self._park(src, tenant, parked_at_ms=int(item["at"]), revivable=True)
                continue
            if not already_dead:
                self.stats.unparked += 1
                metrics.PARKED_CALLS.dec()
            if isinstance(result, Rejection):
                # Not accepted after all: like any dead letter it does not consume its idempotency key.
                self.seen.pop(f"call|{tenant}|{call.event_id}", None)
                if not already_dead:
                    await self._dead(src, result.reason, result.message)
            else:
                if already_dead:
                    self.stats.revived += 1
                await self._emit_rated(src, result)
