"""The invoice job: ledger + catalog -> one JSON invoice per tenant period, stored back in the ledger.

It reads only deduplicated facts (provisioning through FINAL, each call's current rating through
argMax by catalog revision) and leaves every pricing rule to ``rating/`` — the same functions the
reference batch computation in tests uses, so the pipeline and the reference cannot drift apart.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from rating.batch import invoices_from_usage
from rating.catalog import Catalog
from rating.invoice import Invoice
from rating.models import ProvisioningEvent
from rating.periods import parse_month
from rating.subscription import TenantTimeline
from sinks.ledger import Ledger


def month_window(year: int, month: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def timelines_from_ledger(ledger: Ledger, tenant: str | None = None) -> dict[str, TenantTimeline]:
    events: dict[str, list[ProvisioningEvent]] = defaultdict(list)
    for row in ledger.provisioning_rows(tenant):
        events[row["tenant_id"]].append(ProvisioningEvent(**row))
    return {t: TenantTimeline.from_events(t, evs) for t, evs in events.items()}


def compute_invoices(
    ledger: Ledger, catalog: Catalog, period: str, tenant: str | None = None
) -> list[Invoice]:
    year, month = parse_month(period)
    timelines = timelines_from_ledger(ledger, tenant)
    start, end = month_window(year, month)
    usage_by_start = ledger.usage_seconds(start, end)
    usage: dict[tuple[str, date], int] = {
        (t, ps.date()): seconds for (t, ps), seconds in usage_by_start.items() if tenant in (None, t)
    }
    return invoices_from_usage(timelines, usage, catalog, year, month)


def invoice_json(invoice: Invoice, generated_at: datetime) -> str:
    body = invoice.to_json_dict(generated_at.isoformat(timespec="seconds").replace("+00:00", "Z"))
    return json.dumps(body, indent=2) + "\n"


def write_invoices(
    ledger: Ledger, invoices: list[Invoice], out_dir: Path, generated_at: datetime | None = None
) -> list[Path]:
    """Write ``<invoice_id>.json`` files and store invoices with their lines in the ledger.

    Storage is keyed by invoice_id (ReplacingMergeTree by generated_at), so a re-run replaces the
    previous draft in every query that reads FINAL; the files are rewritten byte-identically except
    ``generated_at``.
    """
    generated_at = generated_at or datetime.now(UTC)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for invoice in invoices:
        text = invoice_json(invoice, generated_at)
        path = out_dir / f"{invoice.invoice_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
        body: dict[str, Any] = json.loads(text)
        ledger.add(
            "invoices",
            [
                invoice.invoice_id,
                invoice.tenant_id,
                invoice.period.start.date(),
                invoice.period.end.date(),
                invoice.plan_id,
                invoice.catalog_revision,
                invoice.currency,
                invoice.subtotal,
                invoice.tax,
                invoice.total,
                text,
                generated_at,
            ],
        )
        for line_no, line in enumerate(body["lines"]):
            ledger.add(
                "invoice_lines",
                [
                    invoice.invoice_id,
                    line_no,
                    line["code"],
                    line.get("description", ""),
                    line.get("number"),
                    line["quantity"],
                    line["unit_price"],
                    line["amount"],
                    generated_at,
                ],
            )
    ledger.flush()
    return paths
