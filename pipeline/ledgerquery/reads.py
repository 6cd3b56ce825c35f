"""The ledger's read side: what invoices, replays and reports ask of it (the writer is sinks/ledger.py).

Every query that counts money reads through ``FINAL`` or ``current_ratings`` (argMax by catalog
revision): copies of a record collapse only at merge time (sinks/ledger.py item 2). ``call_from_facts``
is the one place a call is rebuilt from the ledger's facts, for rating/ to rate it as the invoice
job and the tenant API's closed periods both do.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from rating.models import CallEvent
from sinks.columns import COLUMNS, PROVISIONING_COLUMNS
from sinks.errors import LedgerError
from sinks.ledger import Ledger, as_utc

# What a tenant's timeline is rebuilt from: the provisioning event's own fields, not where it was read.
_TIMELINE_COLUMNS = tuple(c for c in PROVISIONING_COLUMNS if c not in ("source_partition", "source_offset"))


def call_from_facts(
    tenant_id: str,
    event_id: str,
    started_at: datetime,
    answered_at: datetime | None,
    ended_at: datetime,
    disposition: str,
) -> CallEvent:
    """A call as the ledger keeps it: the facts rating needs, the rest left empty (they price nothing)."""
    return CallEvent(
        event_id=event_id,
        tenant_id=tenant_id,
        call_id="",
        employee_id=None,
        direction="",
        from_number="",
        to_number="",
        started_at=started_at,
        answered_at=answered_at,
        ended_at=ended_at,
        disposition=disposition,
        gateway_id="",
    )


class LedgerReads:
    """Queries over an open ledger (its client and lock: one connection per process for chdb)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def usage_seconds(self, period_from: datetime, period_to: datetime) -> dict[tuple[str, datetime], int]:
        """Billable seconds per (tenant, period start) for periods starting in [from, to), taking each
        call's current rating (its row with the highest catalog revision)."""
        rows = self.ledger.query(
            """
            SELECT tenant_id, period_start, sum(billable_seconds) FROM current_ratings
            WHERE period_start >= {f:DateTime64(3, 'UTC')} AND period_start < {t:DateTime64(3, 'UTC')}
            GROUP BY tenant_id, period_start
            """,
            {"f": period_from, "t": period_to},
        )
        return {(tenant, as_utc(start)): int(seconds) for tenant, start, seconds in rows}

    def call_facts(
        self, started_from: datetime, started_to: datetime, tenant_id: str | None = None
    ) -> list[tuple[Any, ...]]:
        """The raw facts rating needs of every deduplicated accepted call that started in [from, to):
        ``(tenant_id, event_id, started_at, answered_at, ended_at, disposition, highest catalog revision
        that rated it, late)``.

        Invoices rate these against the tenant's whole provisioning timeline (docs/decisions.md,
        "Order of events"), so the stream's provisional rating never decides money. Every row of one
        call carries the same facts; ``argMin`` by source offset takes the first-seen copy's."""
        tenant_clause = "AND tenant_id = {t:String}" if tenant_id else ""
        rows = self.ledger.query(
            "SELECT tenant_id, event_id, argMin(started_at, source_offset), "  # noqa: S608
            "argMin(answered_at, source_offset), argMin(ended_at, source_offset), "
            "argMin(disposition, source_offset), max(catalog_revision), max(late) FROM rated_calls "
            "WHERE started_at >= {f:DateTime64(3, 'UTC')} AND started_at < {u:DateTime64(3, 'UTC')} "
            f"{tenant_clause} GROUP BY tenant_id, event_id ORDER BY tenant_id, event_id",
            {"f": started_from, "u": started_to, "t": tenant_id},
        )
        return [
            (t, e, as_utc(s), None if a is None else as_utc(a), as_utc(x), d, int(r), bool(late))
            for t, e, s, a, x, d, r, late in rows
        ]

    def current_rating_of(
        self, started_from: datetime, started_to: datetime, tenant_id: str | None = None
    ) -> dict[tuple[str, str], tuple[datetime | None, str, int, int]]:
        """(tenant, event) -> (period start, plan, billable seconds, catalog revision) from
        ``current_ratings``, for calls that started in [from, to)."""
        tenant_clause = "AND r.tenant_id = {t:String}" if tenant_id else ""
        rows = self.ledger.query(
            "SELECT r.tenant_id, r.event_id, r.period_start, r.plan_id, r.billable_seconds, "  # noqa: S608
            "r.catalog_revision FROM current_ratings AS r WHERE (r.tenant_id, r.event_id) IN ("
            "SELECT tenant_id, event_id FROM rated_calls WHERE started_at >= {f:DateTime64(3, 'UTC')} "
            f"AND started_at < {{u:DateTime64(3, 'UTC')}}) {tenant_clause}",
            {"f": started_from, "u": started_to, "t": tenant_id},
        )
        return {
            (t, e): (None if p is None else as_utc(p), str(plan), int(b), int(rev))
            for t, e, p, plan, b, rev in rows
        }

    def provisioning_rows(self, tenant_id: str | None = None) -> list[dict[str, Any]]:
        where = "WHERE tenant_id = {t:String}" if tenant_id else ""
        rows = self.ledger.query(
            # Only constant column names and a fixed WHERE are interpolated; the tenant is a parameter.
            f"SELECT {', '.join(_TIMELINE_COLUMNS)} FROM provisioning_events FINAL {where} "  # noqa: S608
            "ORDER BY tenant_id, occurred_at, event_id",
            {"t": tenant_id} if tenant_id else None,
        )
        out = []
        for row in rows:
            record = dict(zip(_TIMELINE_COLUMNS, row, strict=True))
            record["occurred_at"] = as_utc(record["occurred_at"])
            out.append(record)
        return out

    def count(self, table: str, final: bool = True) -> int:
        if table not in COLUMNS:
            msg = f"unknown ledger table {table}"
            raise LedgerError(msg)
        rows = self.ledger.query(f"SELECT count() FROM {table}{' FINAL' if final else ''}")  # noqa: S608
        return int(rows[0][0])

    def dead_letter_counts(self) -> dict[str, int]:
        rows = self.ledger.query(
            "SELECT reason, count() FROM dead_letters FINAL GROUP BY reason ORDER BY reason"
        )
        return {reason: int(n) for reason, n in rows}

    def billable_seconds_by_tenant(self) -> dict[str, int]:
        rows = self.ledger.query(
            "SELECT tenant_id, sum(billable_seconds) FROM current_ratings "
            "GROUP BY tenant_id ORDER BY tenant_id"
        )
        return {tenant: int(seconds) for tenant, seconds in rows}

    def invoice_rows(self, tenant_id: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Current row per invoice id (FINAL), newest generation."""
        where = []
        params: dict[str, Any] = {}
        if tenant_id:
            where.append("tenant_id = {t:String}")
            params["t"] = tenant_id
        if status:
            where.append("status = {s:String}")
            params["s"] = status
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        names = (
            "invoice_id",
            "tenant_id",
            "period_start",
            "period_end",
            "plan_id",
            "catalog_revision",
            "subtotal",
            "total",
            "body",
            "status",
            "generated_at",
        )
        rows = self.ledger.query(
            f"SELECT {', '.join(names)} FROM invoices FINAL {clause} ORDER BY tenant_id, period_start",  # noqa: S608
            params or None,
        )
        return [dict(zip(names, row, strict=True)) for row in rows]

    def carried_adjustments(self, corrects_invoice_id: str, excluding_carrier: str) -> Decimal:
        """Adjustments for an invoice already carried by *final* invoices (drafts may still change)."""
        rows = self.ledger.query(
            "SELECT sum(amount) FROM adjustments FINAL WHERE corrects_invoice_id = {c:String} "
            "AND status = 'final' AND carried_on_invoice_id != {x:String}",
            {"c": corrects_invoice_id, "x": excluding_carrier},
        )
        return Decimal(rows[0][0] or 0)

    def credit_balances(
        self, excluding_invoices: Sequence[str], tenant_id: str | None = None
    ) -> dict[str, Decimal]:
        """Each tenant's customer credit balance on its *final* invoices (drafts may still change),
        leaving out ``excluding_invoices``: the ones being computed, whose own credit is theirs to add."""
        rows = self.ledger.query(
            "SELECT tenant_id, sum(granted) - sum(applied) FROM customer_credit "
            "WHERE invoice_id NOT IN {x:Array(String)} AND ({t:String} = '' OR tenant_id = {t:String}) "
            "GROUP BY tenant_id",
            {"x": list(excluding_invoices), "t": tenant_id or ""},
        )
        return {str(tenant): Decimal(balance) for tenant, balance in rows}
