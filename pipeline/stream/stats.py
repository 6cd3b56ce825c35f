"""Counters of one worker run: the source of the worker's JSON result and its Prometheus metrics."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """Counters of this worker run (also the source of the Prometheus metrics)."""

    consumed: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    rated: int = 0
    parked: int = 0
    unparked: int = 0
    revived: int = 0  # dead-lettered NO_SUBSCRIPTION, then rated when later provisioning covered them
    rebalanced: int = 0  # period balances rewritten because provisioning changed how calls rate
    keys_expired: int = 0
    # Calls rated into a period the live window has closed: no live balance changed, the ledger decides
    # whether each is new (pipeline/stream/window.py).
    closed_period: int = 0
    # Copies the stream accepted (its keys were gone: fresh cluster, past retention) that the ledger
    # already held; the sink counted them as duplicates and wrote nothing (sinks/ledger.py item 4).
    duplicates_in_ledger: Counter[str] = field(default_factory=Counter)
    # Kafka timestamp (ms) of the last record handled per input partition.
    last_record_ms: dict[int, int] = field(default_factory=dict)
    # Per wall-clock minute: [events consumed, duplicates, dead letters], for "the last minutes".
    minutes: dict[int, list[int]] = field(default_factory=dict)

    def tick(self, consumed: int = 0, duplicates: int = 0, dead: int = 0) -> None:
        minute = int(time.time() // 60)
        bucket = self.minutes.get(minute)
        if bucket is None:  # a new minute: only then can buckets fall out of the hour kept
            bucket = self.minutes[minute] = [0, 0, 0]
            for old in [m for m in self.minutes if m < minute - 60]:
                del self.minutes[old]
        bucket[0] += consumed
        bucket[1] += duplicates
        bucket[2] += dead

    def window(self, minutes: int) -> dict[str, int]:
        since = int(time.time() // 60) - minutes + 1
        totals = [0, 0, 0]
        for minute, bucket in self.minutes.items():
            if minute >= since:
                totals = [a + b for a, b in zip(totals, bucket, strict=True)]
        return {"minutes": minutes, "consumed": totals[0], "duplicates": totals[1], "dead_letters": totals[2]}

    def total(self) -> int:
        return sum(self.consumed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "consumed": dict(self.consumed),
            "duplicates": dict(self.duplicates),
            "duplicates_in_ledger": dict(self.duplicates_in_ledger),
            "dead_letters": dict(self.dead_letters),
            "rated": self.rated,
            "parked": self.parked,
            "unparked": self.unparked,
            "revived": self.revived,
            "rebalanced": self.rebalanced,
            "keys_expired": self.keys_expired,
            "closed_period": self.closed_period,
        }


class _FaultCounter(logging.Handler):
    def __init__(self, owner: Any) -> None:
        super().__init__(level=logging.ERROR)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        self.owner.faults += 1


def count_faults(owner: Any, loggers: Iterable[str]) -> None:
    """Count ERROR records of these loggers in ``owner.faults`` (the worker's run result reports them)."""
    counter = _FaultCounter(owner)
    for name in loggers:
        logging.getLogger(name).addHandler(counter)
