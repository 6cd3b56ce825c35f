"""Dedupe-key retention (spec §2) and the dedupe lookup, part of the Meter (pipeline/stream/worker.py)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pipeline.stream.parts import MeterParts

log = logging.getLogger(__name__)


class Retention(MeterParts):
    # Per input partition, the newest event time seen and the event-time day of the last sweep.
    _watermark_ms: dict[int, int]
    _swept_day: dict[int, int]

    def _seen_get(self, key: str) -> Any:
        """``seen.get(key)`` without Faust's path through two KeyErrors per miss (most lookups miss)."""
        store = self.seen.data
        raw = store._get(store._encode_key(key))
        return None if raw is None else store._decode_value(raw)

    def _advance_watermark(self, partition: int, event_ms: int) -> None:
        # Clamp to the wall clock: one record with a clock far in the future must not expire every key.
        event_ms = min(event_ms, int(time.time() * 1000))
        if event_ms <= self._watermark_ms.get(partition, -1):
            return
        self._watermark_ms[partition] = event_ms
        day = event_ms // 86_400_000
        if self._swept_day.get(partition) != day:
            self._swept_day[partition] = day
            self.sweep_seen(partition, event_ms - self.settings.dedupe_retention_days * 86_400_000)

    def sweep_seen(self, partition: int, older_than_ms: int) -> int:
        """Forget idempotency keys of this partition whose event time is before ``older_than_ms``.

        Runs inside the current event's transaction (same partition), so the deletions reach the
        changelog atomically with everything else; a retry older than the retention window is then
        treated as a new event, which the retention (> one period + settlement window) makes moot.
        """
        store = self.seen.data
        db_for = getattr(store, "_db_for_partition", None)
        if db_for is None:
            return 0
        expired = []
        for raw_key, raw_value in db_for(partition).items():
            try:
                key, value = json.loads(raw_key), json.loads(raw_value)
            except (ValueError, TypeError):
                continue  # Faust's own bookkeeping keys (persisted offsets)
            # Provisioning keys hold their event time; call keys [ended, started, raw ms] (_call_fact).
            event_ms = value[0] if isinstance(value, list) and value else value
            if isinstance(event_ms, int) and isinstance(key, str) and event_ms < older_than_ms:
                expired.append(key)
        for key in expired:
            del self.seen[key]
        if expired:
            log.info("dedupe retention: forgot %d keys of partition %d", len(expired), partition)
        self.stats.keys_expired += len(expired)
        return len(expired)
