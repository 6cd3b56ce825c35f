"""The live window of each input partition: which periods the live balances answer for, and which dedupe
keys must still be held (docs/decisions.md, "Deduplication" and "Live balances equal the ledger").

The window follows event time: per input partition, the newest day (UTC) on which an accepted event
ended or occurred, never later than the wall clock (a record with a clock far ahead must not close
every period). From that day ``D`` and the retention ``R``:

- a period is *live* while it ended after ``D - R`` (keys.period_is_live): the current period always,
  and each earlier one until ``R`` days after its end (one period plus the settlement window, spec §2);
- a dedupe key is held while its event time is after ``D - R - 31 days`` (the longest period), so every
  call of a live period is still known and a copy can never be counted twice in a live balance;
- a call of a closed period is rated for the ledger, which decides whether it is a copy (its first-seen
  check, sinks/ledger.py point 4), and changes no live balance and sends no alert.

``D`` is a table value (``keys.window_key``), written only when the day changes, inside that event's
transaction; it survives restarts and is what the tenant API reads. It never moves back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from pipeline.stream.keys import DAY_MS, MAX_PERIOD_MS, horizon_ms, period_is_live, window_key
from pipeline.stream.state import StateTable


class LiveWindow:
    def __init__(
        self, state: StateTable, retention_days: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.state = state
        self.retention_days = retention_days
        self.clock = clock
        self._day: dict[int, int | None] = {}

    def forget(self) -> None:
        """At a rebalance: partitions may have moved, read the day from the table again."""
        self._day.clear()

    def day_ms(self, partition: int) -> int | None:
        if partition not in self._day:
            stored = self.state.get(partition, window_key(partition))
            self._day[partition] = stored if isinstance(stored, int) else None
        return self._day[partition]

    def advance(self, partition: int, event_ms: int) -> bool:
        """An accepted event's time; True when the window moved to a later day (the caller sweeps)."""
        capped = min(event_ms, int(self.clock() * 1000))
        day = capped - capped % DAY_MS
        current = self.day_ms(partition)
        if current is not None and day <= current:
            return False
        self._day[partition] = day
        self.state.put(partition, window_key(partition), day)
        return True

    def is_live(self, partition: int, period_end: datetime) -> bool:
        return period_is_live(self.day_ms(partition), self.retention_days, period_end)

    def horizon_ms(self, partition: int) -> int | None:
        return horizon_ms(self.day_ms(partition), self.retention_days)

    def key_floor_ms(self, partition: int) -> int | None:
        """Dedupe keys whose event time is before this may be forgotten (None: keep every key)."""
        horizon = self.horizon_ms(partition)
        return None if horizon is None else horizon - MAX_PERIOD_MS
