"""What the worker's tables hold under which key, for the readers outside the stream: the tenant API's
view reads the ``balances`` changelog (pipeline/tenantapi/view.py) and must agree with the worker on
its keys and on which periods the live balances still answer for (``period_is_live``)."""

from __future__ import annotations

from datetime import datetime

DAY_MS = 86_400_000
# The longest billing period (31 days): a call's period ends at most this long after the call started.
MAX_PERIOD_MS = 31 * DAY_MS
WINDOW_PREFIX = "~window|"


def balance_key(tenant_id: str, period_start: datetime) -> str:
    """A tenant period's live balance (billable seconds) in the ``balances`` table."""
    return f"{tenant_id}|{period_start.isoformat()}"


def window_key(partition: int) -> str:
    """The event-time day the live window of an input partition has reached (pipeline/stream/window.py),
    in the same ``balances`` table so the tenant API sees it commit with the balances it governs."""
    return f"{WINDOW_PREFIX}{partition}"


def window_partition(key: str) -> int | None:
    """The partition of a ``window_key``, or None for any other key."""
    if not key.startswith(WINDOW_PREFIX):
        return None
    try:
        return int(key[len(WINDOW_PREFIX) :])
    except ValueError:
        return None


def horizon_ms(window_day_ms: int | None, retention_days: int) -> int | None:
    """Periods that ended at or before this instant are closed: no live balance or alert answers for
    them any more, the ledger does. None while the partition has seen no event (nothing is closed)."""
    if window_day_ms is None:
        return None
    return window_day_ms - retention_days * DAY_MS


def period_is_live(window_day_ms: int | None, retention_days: int, period_end: datetime) -> bool:
    """Whether the live balance of a period (of a tenant on this partition) is still kept and exact: the
    period ended less than ``retention_days`` before the partition's event-time day. Every call of such a
    period started after ``horizon - MAX_PERIOD_MS``, so its dedupe key is still held (window.py)."""
    horizon = horizon_ms(window_day_ms, retention_days)
    return horizon is None or int(period_end.timestamp() * 1000) > horizon
