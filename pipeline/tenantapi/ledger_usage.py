"""The usage of a period the live window has closed, as the ledger has it (docs/decisions.md, "Live
balances equal the ledger"): the first-seen copy of each of the period's calls in ``rated_calls``, rated
against the tenant's timeline by rating/, as the invoice job rates them. Asked through the process
holding an embedded ledger (pipeline/ledgerquery/sql.py ``run_sql``), read-only."""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.ledgerquery.reads import call_from_facts
from pipeline.ledgerquery.sql import run_sql
from rating.calls import RatedCall, rate_call
from rating.catalog import Catalog
from rating.periods import Period
from rating.subscription import TenantTimeline

_FACTS = (
    "SELECT event_id, argMin(started_at, source_offset), argMin(answered_at, source_offset), "
    "argMin(ended_at, source_offset), argMin(disposition, source_offset) FROM rated_calls "
    "WHERE tenant_id = {t:String} AND started_at >= {f:DateTime64(3, 'UTC')} "
    "AND started_at < {u:DateTime64(3, 'UTC')} GROUP BY event_id"
)


def _ch_time(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class LedgerUsage:
    def __init__(
        self, dsn: str, password: str | None, catalog: Catalog, timeout_seconds: float = 5.0
    ) -> None:
        self.dsn = dsn
        self.password = password
        self.catalog = catalog
        self.timeout_seconds = timeout_seconds

    def __call__(self, tenant_id: str, timeline: TenantTimeline, period: Period) -> int:
        """Billable seconds; a LedgerError when the ledger cannot be asked."""
        # Text ClickHouse parses as DateTime64 (UTC): parameters may travel as JSON to the ledger's holder.
        parameters = {"t": tenant_id, "f": _ch_time(period.start), "u": _ch_time(period.end)}
        _columns, rows = run_sql(self.dsn, self.password, _FACTS, self.timeout_seconds, parameters)
        used = 0
        for event_id, started, answered, ended, disposition in rows:
            call = call_from_facts(
                tenant_id,
                event_id,
                datetime.fromisoformat(started),
                _at(answered),
                datetime.fromisoformat(ended),
                disposition,
            )
            rated = rate_call(call, timeline, self.catalog)
            if isinstance(rated, RatedCall) and rated.period.start == period.start:
                used += rated.billable_seconds
        return used
